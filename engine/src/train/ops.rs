//! Differentiable building blocks written from basic candle ops.
//!
//! candle's fused `candle_nn::ops::rms_norm`, `softmax_last_dim` and `rotary_emb::rope*` have no
//! backward and silently stop gradients, so the training forward must not use them; these
//! versions are compositions of ops that candle differentiates (`sqr`, `mean_keepdim`,
//! `broadcast_mul`, `exp`, `narrow`, `cat`, ...). Each one computes what its counterpart in the
//! serving forward (`crate::model::llama`) computes.

use candle_core::{DType, Device, Result, Tensor, D};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let inv = x
        .sqr()?
        .mean_keepdim(D::Minus1)?
        .affine(1.0, eps)?
        .sqrt()?
        .recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// Softmax over the last dimension.
///
/// The row maximum is subtracted for range only; it is detached because softmax does not
/// depend on it, and detaching keeps the graph free of `max`'s tie-breaking gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension (max-shifted, as [`softmax_last_dim`]).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// SiLU `x · σ(x)`, written as `x / (1 + e⁻ˣ)` like the serving forward.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let denom = x.neg()?.exp()?.affine(1.0, 1.0)?;
    x.div(&denom)
}

/// Rotary tables for a run of positions: `cos` and `sin`, each `[len, head_dim/2]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// Cosines of `position · inv_freq`.
    pub cos: Tensor,
    /// Sines of `position · inv_freq`.
    pub sin: Tensor,
}

impl RopeTables {
    /// Tables for positions `start .. start + len` with the given inverse frequencies.
    ///
    /// Angles are formed in f64 from the f32 frequencies and rounded once, exactly as the
    /// serving rotary table is built, so both paths rotate by the same numbers.
    pub fn new(
        inv_freq: &[f32],
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in inv_freq {
                let a = p as f64 * f as f64;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let make = |v: Vec<f64>| -> Result<Tensor> {
            let t = Tensor::from_vec(v, (len, half), device)?;
            // Round through f32 first so an F32 run matches the serving table bit for bit.
            match dtype {
                DType::F64 => Ok(t),
                _ => t.to_dtype(DType::F32)?.to_dtype(dtype),
            }
        };
        Ok(RopeTables {
            cos: make(cos)?,
            sin: make(sin)?,
        })
    }
}

/// Rotate-half rotary embedding of `x` (`[.., len, head_dim]`) with tables for its `len`
/// positions: `(x₁, x₂) ↦ (x₁ cos − x₂ sin, x₂ cos + x₁ sin)`.
pub fn rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let last = x.rank() - 1;
    let x1 = x.narrow(last, 0, half)?;
    let x2 = x.narrow(last, half, half)?;
    let (c, s) = (&tables.cos, &tables.sin);
    let lo = (x1.broadcast_mul(c)? - x2.broadcast_mul(s)?)?;
    let hi = (x2.broadcast_mul(c)? + x1.broadcast_mul(s)?)?;
    Tensor::cat(&[&lo, &hi], last)
}

/// Repeats each of the `kv_heads` heads of `x` (`[batch, kv_heads, len, head_dim]`) `n` times
/// in place, so query head `h` meets key/value head `h / n` (grouped-query attention).
pub fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, len, hd) = x.dims4()?;
    Tensor::cat(&vec![x; n], 2)?.reshape((b, kvh * n, len, hd))
}

/// Additive causal mask `[len, prefix + len]`: query `i` sees the `prefix` virtual positions
/// and real positions `0..=i`; everything else gets `-inf`.
pub fn causal_mask(len: usize, prefix: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let keys = prefix + len;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j <= prefix + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (len, keys), device)?.to_dtype(dtype)
}

/// `log p(target)` at every position: `logits` `[batch, len, vocab]`, `targets` `[batch, len]`
/// (u32) → `[batch, len]`.
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    logp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)
}
