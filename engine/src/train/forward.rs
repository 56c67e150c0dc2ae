//! [`TrainModel`]: the Llama-family forward on candle autograd.
//!
//! It computes what `crate::model::Llama::forward` computes (same RMSNorm, rotate-half rotary
//! with the same frequencies, grouped-query attention, SiLU MLP, Qwen2 biases, prefix virtual
//! tokens without rotary and real positions starting after them), but with candle ops that
//! carry gradients to the adapter's `Var`s. Base weights are frozen tensors (or quantized
//! [`QMatMulOp`]s) and never receive gradient. A batch is right-padded: with a causal mask a
//! real token never sees the padding after it, so no padding mask is needed.

use std::sync::Arc;

use candle_core::{CustomOp1, DType, Device, Tensor};

use super::adapter::TrainAdapter;
use super::error::TrainError;
use super::ops::{self, RopeTables};
use super::qmatmul::QMatMulOp;
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
    Quantized(Arc<Box<dyn CustomOp1 + Send + Sync>>),
}

/// A frozen projection whose output is the concatenation of its parts' outputs (the fused
/// q/k/v and gate/up projections), plus an optional bias.
#[derive(Clone)]
struct BaseLinear {
    parts: Vec<BaseWeight>,
    bias: Option<Tensor>,
}

impl BaseLinear {
    fn new(linears: &[&Linear], opts: TrainOptions, device: &Device) -> Result<Self, TrainError> {
        let parts = if opts.quantized_base {
            linears
                .iter()
                .map(|l| {
                    let op: Box<dyn CustomOp1 + Send + Sync> =
                        Box::new(QMatMulOp::new(l.weight.clone()));
                    BaseWeight::Quantized(Arc::new(op))
                })
                .collect()
        } else {
            // One dense matrix for the fused parts: one matmul instead of several.
            let cols = linears.first().map_or(0, |l| l.weight.cols());
            let rows: usize = linears.iter().map(|l| l.weight.rows()).sum();
            let mut all = Vec::with_capacity(rows * cols);
            for l in linears {
                all.extend(l.weight.to_f32());
            }
            vec![BaseWeight::Dense(tensor(
                all,
                (rows, cols),
                opts.dtype,
                device,
            )?)]
        };
        let bias = if linears.iter().any(|l| l.bias.is_some()) {
            let mut b = Vec::new();
            for l in linears {
                match &l.bias {
                    Some(v) => b.extend_from_slice(v),
                    None => b.extend(std::iter::repeat_n(0.0, l.weight.rows())),
                }
            }
            let n = b.len();
            Some(tensor(b, n, opts.dtype, device)?)
        } else {
            None
        };
        Ok(BaseLinear { parts, bias })
    }

    fn from_fused(f: &Fused, opts: TrainOptions, device: &Device) -> Result<Self, TrainError> {
        match f {
            Fused::One(l) => Self::new(&[l], opts, device),
            Fused::Split(parts) => Self::new(&parts.iter().collect::<Vec<_>>(), opts, device),
        }
    }

    /// `x` `[rows, in]` → `[rows, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        let mut outs = Vec::with_capacity(self.parts.len());
        for p in &self.parts {
            outs.push(match p {
                BaseWeight::Dense(w) => x.matmul(&w.t()?)?,
                BaseWeight::Quantized(op) => x.contiguous()?.apply_op1_arc(op.clone())?,
            });
        }
        let y = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 1)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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
    qkv: BaseLinear,
    o: BaseLinear,
    ffn_norm: Tensor,
    gate_up: BaseLinear,
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
        for l in &weights.layers {
            layers.push(TrainLayer {
                attn_norm: vec(&l.attn_norm)?,
                qkv: BaseLinear::from_fused(&l.qkv, opts, device)?,
                o: BaseLinear::new(&[&l.o], opts, device)?,
                ffn_norm: vec(&l.ffn_norm)?,
                gate_up: BaseLinear::from_fused(&l.gate_up, opts, device)?,
                down: BaseLinear::new(&[&l.down], opts, device)?,
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
            lm_head: BaseLinear::new(&[&head], opts, device)?,
            inv_freq,
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
            for p in &l.parts {
                if let BaseWeight::Dense(w) = p {
                    out.push(w.clone());
                }
            }
            out.extend(l.bias.clone());
        };
        linear(&self.lm_head, &mut out);
        for l in &self.layers {
            out.push(l.attn_norm.clone());
            out.push(l.ffn_norm.clone());
            for p in [&l.qkv, &l.o, &l.gate_up, &l.down] {
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
        let prefix = adapter.map_or(0, TrainAdapter::prefix_len);
        let (b, t) = self.check_batch(batch, prefix)?;
        let hidden = self.hidden_states(batch, b, t, adapter)?;
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
        let b = batch.len();
        let mut targets = vec![PAD_TOKEN; b * (t - 1)];
        let mut mask = vec![0f32; b * (t - 1)];
        for (i, seq) in batch.iter().enumerate() {
            for j in 0..seq.len().saturating_sub(1) {
                targets[i * (t - 1) + j] = seq[j + 1];
                mask[i * (t - 1) + j] = 1.0;
            }
        }
        let targets = Tensor::from_vec(targets, (b, t - 1), &self.device)?;
        let mask = tensor(mask, (b, t - 1), self.dtype, &self.device)?;
        let inputs = logits.narrow(1, 0, t - 1)?.contiguous()?;
        Ok((ops::gather_logprobs(&inputs, &targets)? * mask)?)
    }

    /// Validates a batch; returns (batch size, padded length).
    fn check_batch(&self, batch: &[&[u32]], prefix: usize) -> Result<(usize, usize), TrainError> {
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        if t == 0 {
            return Err(TrainError::EmptyBatch);
        }
        let context = self.cfg.max_position_embeddings;
        if prefix + t > context {
            return Err(TrainError::ContextLength {
                needed: prefix + t,
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

    /// Final-norm hidden states `[batch · len, hidden]`.
    fn hidden_states(
        &self,
        batch: &[&[u32]],
        b: usize,
        t: usize,
        adapter: Option<&TrainAdapter>,
    ) -> Result<Tensor, TrainError> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        // Padding rows stay zero: RMSNorm of zero is zero, so they cannot produce NaNs.
        let mut x0 = vec![0f32; b * t * h];
        for (i, seq) in batch.iter().enumerate() {
            for (j, &tok) in seq.iter().enumerate() {
                let r = i * t + j;
                self.embed
                    .dequantize_row(tok as usize, &mut x0[r * h..(r + 1) * h])?;
            }
        }
        let mut x = tensor(x0, (b * t, h), self.dtype, &self.device)?;
        let prefix = adapter.map_or(0, TrainAdapter::prefix_len);
        let rope = RopeTables::new(&self.inv_freq, prefix, t, self.dtype, &self.device)?;
        let mask = ops::causal_mask(t, prefix, self.dtype, &self.device)?;
        let eps = cfg.rms_norm_eps as f64;
        for (li, layer) in self.layers.iter().enumerate() {
            let normed = ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let attn = self.attention(li, layer, &normed, (b, t), adapter, &rope, &mask)?;
            let mut o = layer.o.forward(&attn)?;
            add_lora(&mut o, adapter, li, Proj::O, &attn)?;
            x = (x + o)?;

            let normed = ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let inter = cfg.intermediate_size;
            let gu = layer.gate_up.forward(&normed)?;
            let mut gate = gu.narrow(1, 0, inter)?;
            let mut up = gu.narrow(1, inter, inter)?;
            add_lora(&mut gate, adapter, li, Proj::Gate, &normed)?;
            add_lora(&mut up, adapter, li, Proj::Up, &normed)?;
            let act = (ops::silu(&gate)? * up)?;
            let mut down = layer.down.forward(&act)?;
            add_lora(&mut down, adapter, li, Proj::Down, &act)?;
            x = (x + down)?;
        }
        Ok(ops::rms_norm(&x, &self.norm, eps)?)
    }

    /// Causal self-attention of one layer: `normed` `[b·t, hidden]` → `[b·t, q_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &TrainLayer,
        normed: &Tensor,
        (b, t): (usize, usize),
        adapter: Option<&TrainAdapter>,
        rope: &RopeTables,
        mask: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let cfg = &self.cfg;
        let (hd, nh, kvh) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let qkv = layer.qkv.forward(normed)?;
        let mut q = qkv.narrow(1, 0, q_dim)?;
        let mut k = qkv.narrow(1, q_dim, kv_dim)?;
        let mut v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?;
        add_lora(&mut q, adapter, li, Proj::Q, normed)?;
        add_lora(&mut k, adapter, li, Proj::K, normed)?;
        add_lora(&mut v, adapter, li, Proj::V, normed)?;
        let heads = |x: Tensor, n: usize| -> Result<Tensor, TrainError> {
            Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = ops::rope(&heads(q, nh)?, rope)?;
        let mut k = ops::rope(&heads(k, kvh)?, rope)?;
        let mut v = heads(v, kvh)?;
        if let Some(p) = adapter.and_then(|a| a.prefix(li)) {
            // Virtual keys/values go first, unrotated, shared by every sequence of the batch.
            let virt = |x: &Tensor| -> Result<Tensor, TrainError> {
                let n = x.dim(0)?;
                Ok(x.reshape((n, kvh, hd))?
                    .transpose(0, 1)?
                    .unsqueeze(0)?
                    .broadcast_as((b, kvh, n, hd))?
                    .contiguous()?)
            };
            k = Tensor::cat(&[&virt(p.k.as_tensor())?, &k], 2)?;
            v = Tensor::cat(&[&virt(p.v.as_tensor())?, &v], 2)?;
        }
        let group = nh / kvh;
        let k = ops::repeat_kv(&k, group)?;
        let v = ops::repeat_kv(&v, group)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .affine(scale, 0.0)?
            .broadcast_add(mask)?;
        let probs = ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * t, q_dim))?;
        Ok(out)
    }
}

/// Adds the adapter's LoRA delta for (`layer`, `proj`) computed from `input`, if it has one.
fn add_lora(
    out: &mut Tensor,
    adapter: Option<&TrainAdapter>,
    layer: usize,
    proj: Proj,
    input: &Tensor,
) -> Result<(), TrainError> {
    if let Some(l) = adapter.and_then(|a| a.lora(layer, proj)) {
        *out = (&*out + l.delta(input)?)?;
    }
    Ok(())
}
