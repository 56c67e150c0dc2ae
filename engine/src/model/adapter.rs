//! [`AdapterWeights`]: an adapter in the form the serving forward runs, plain f32 buffers behind
//! the [`AdapterHook`] seam. PEFT files (the adapters crate) and trained parameters
//! ([`crate::train::TrainAdapter::to_weights`]) both end up here, so what is trained, what is
//! uploaded and what is served are one representation.
//!
//! LoRA follows PEFT: `y = x Wᵀ + scale · (x Aᵀ) Bᵀ` with `A` `[r, in]`, `B` `[out, r]` and
//! `scale = alpha / r` (`alpha / √r` with rsLoRA). Prefix tuning gives each layer
//! `num_virtual_tokens` key and value rows that start every sequence's cache.

use std::collections::BTreeMap;

use super::config::ModelConfig;
use super::hooks::{AdapterHook, Proj, ProjRows};
use super::simd;

/// `(in_features, out_features)` of a projection of `cfg`.
pub fn proj_dims(cfg: &ModelConfig, proj: Proj) -> (usize, usize) {
    let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
    match proj {
        Proj::Q => (h, cfg.q_dim()),
        Proj::K | Proj::V => (h, cfg.kv_dim()),
        Proj::O => (cfg.q_dim(), h),
        Proj::Gate | Proj::Up => (h, inter),
        Proj::Down => (inter, h),
    }
}

/// Why a set of adapter weights does not fit a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdapterShapeError {
    /// A LoRA pair's shape disagrees with the projection or its rank.
    #[error("layer {layer} {module}: {message}")]
    Lora {
        /// Decoder layer.
        layer: usize,
        /// PEFT module name.
        module: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The prefix does not have one key and one value block per layer of `kv_dim` columns.
    #[error("prefix: {0}")]
    Prefix(String),
    /// A value is NaN or infinite.
    #[error("{0} holds a non-finite value")]
    NonFinite(String),
    /// Nothing to apply.
    #[error("an adapter needs LoRA weights, a prefix, or both")]
    Empty,
}

/// One LoRA pair, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    /// `lora_A.weight`, `[rank, in_dim]`.
    pub a: Vec<f32>,
    /// `lora_B.weight`, `[out_dim, rank]`.
    pub b: Vec<f32>,
    /// Rank `r`.
    pub rank: usize,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// `alpha / r` (or `alpha / √r`).
    pub scale: f32,
}

/// A LoRA pair prepared for the forward: `Bᵀ` so the second product is contiguous scaled adds.
#[derive(Debug, Clone)]
struct ServedLora {
    w: LoraWeights,
    /// `Bᵀ`, `[rank, out_dim]`.
    bt: Vec<f32>,
}

/// Per-layer virtual key and value rows, `num_virtual_tokens × kv_dim` each.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixWeights {
    /// `(keys, values)` for every layer.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// Virtual tokens.
    pub num_virtual_tokens: usize,
}

/// An adapter ready to serve: LoRA pairs by (layer, projection) and/or a prefix.
#[derive(Debug, Clone)]
pub struct AdapterWeights {
    lora: BTreeMap<(usize, Proj), ServedLora>,
    prefix: Option<PrefixWeights>,
}

fn check_finite(what: impl FnOnce() -> String, v: &[f32]) -> Result<(), AdapterShapeError> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(AdapterShapeError::NonFinite(what()))
    }
}

impl AdapterWeights {
    /// Checks every shape against `cfg` and every value for finiteness.
    pub fn new(
        cfg: &ModelConfig,
        lora: BTreeMap<(usize, Proj), LoraWeights>,
        prefix: Option<PrefixWeights>,
    ) -> Result<Self, AdapterShapeError> {
        if lora.is_empty() && prefix.is_none() {
            return Err(AdapterShapeError::Empty);
        }
        let mut served = BTreeMap::new();
        for ((layer, proj), w) in lora {
            let err = |message: String| AdapterShapeError::Lora {
                layer,
                module: proj.module_name(),
                message,
            };
            if layer >= cfg.num_layers {
                return Err(err(format!("the model has {} layers", cfg.num_layers)));
            }
            let (in_dim, out_dim) = proj_dims(cfg, proj);
            if w.rank == 0 {
                return Err(err("rank 0".into()));
            }
            if (w.in_dim, w.out_dim) != (in_dim, out_dim) {
                return Err(err(format!(
                    "adapter is {}→{}, the model's projection is {in_dim}→{out_dim}",
                    w.in_dim, w.out_dim
                )));
            }
            if w.a.len() != w.rank * in_dim {
                return Err(err(format!(
                    "lora_A has {} values, expected [{}, {in_dim}]",
                    w.a.len(),
                    w.rank
                )));
            }
            if w.b.len() != out_dim * w.rank {
                return Err(err(format!(
                    "lora_B has {} values, expected [{out_dim}, {}]",
                    w.b.len(),
                    w.rank
                )));
            }
            if !w.scale.is_finite() {
                return Err(err(format!("scale {} is not finite", w.scale)));
            }
            let name = || format!("layer {layer} {}", proj.module_name());
            check_finite(name, &w.a)?;
            check_finite(name, &w.b)?;
            let mut bt = vec![0f32; w.b.len()];
            for j in 0..out_dim {
                for k in 0..w.rank {
                    bt[k * out_dim + j] = w.b[j * w.rank + k];
                }
            }
            served.insert((layer, proj), ServedLora { w, bt });
        }
        if let Some(p) = &prefix {
            let kv = cfg.kv_dim();
            if p.num_virtual_tokens == 0 {
                return Err(AdapterShapeError::Prefix("zero virtual tokens".into()));
            }
            if p.layers.len() != cfg.num_layers {
                return Err(AdapterShapeError::Prefix(format!(
                    "{} layers, the model has {}",
                    p.layers.len(),
                    cfg.num_layers
                )));
            }
            for (l, (k, v)) in p.layers.iter().enumerate() {
                let want = p.num_virtual_tokens * kv;
                if k.len() != want || v.len() != want {
                    return Err(AdapterShapeError::Prefix(format!(
                        "layer {l}: {} key and {} value values, expected {} × {kv}",
                        k.len(),
                        v.len(),
                        p.num_virtual_tokens
                    )));
                }
                check_finite(|| format!("prefix layer {l}"), k)?;
                check_finite(|| format!("prefix layer {l}"), v)?;
            }
        }
        Ok(AdapterWeights {
            lora: served,
            prefix,
        })
    }

    /// LoRA pairs in (layer, projection) order.
    pub fn lora(&self) -> impl Iterator<Item = (&(usize, Proj), &LoraWeights)> {
        self.lora.iter().map(|(k, s)| (k, &s.w))
    }

    /// The prefix, if any.
    pub fn prefix(&self) -> Option<&PrefixWeights> {
        self.prefix.as_ref()
    }

    /// Largest LoRA rank (0 without LoRA).
    pub fn max_rank(&self) -> usize {
        self.lora.values().map(|s| s.w.rank).max().unwrap_or(0)
    }

    /// Projections that carry LoRA in at least one layer.
    pub fn targets(&self) -> Vec<Proj> {
        let mut t: Vec<Proj> = self.lora.keys().map(|&(_, p)| p).collect();
        t.sort();
        t.dedup();
        t
    }

    /// Bytes held in memory (weights, transposed copies and prefix).
    pub fn resident_bytes(&self) -> usize {
        let lora: usize = self
            .lora
            .values()
            .map(|s| s.w.a.len() + s.w.b.len() + s.bt.len())
            .sum();
        let prefix: usize = self
            .prefix
            .iter()
            .flat_map(|p| p.layers.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        (lora + prefix) * std::mem::size_of::<f32>()
    }
}

impl AdapterHook for AdapterWeights {
    fn add_delta(&self, rows: ProjRows<'_>) {
        let Some(l) = self.lora.get(&(rows.layer, rows.proj)) else {
            return;
        };
        let w = &l.w;
        // A hook must not panic inside the forward: shapes were checked in `new` against the
        // model config, so a mismatch here means the hook was given another model's rows.
        if rows.in_dim != w.in_dim
            || rows.out_dim != w.out_dim
            || rows.x.len() < rows.rows * w.in_dim
            || rows.out_offset + w.out_dim > rows.out_stride
            || rows.out.len()
                < rows.rows.saturating_sub(1) * rows.out_stride + rows.out_offset + w.out_dim
        {
            return;
        }
        let k = simd::kernels();
        let (rank, in_dim, n) = (w.rank, w.in_dim, rows.rows);
        // `A` row by row, each against every input row while it is in cache: the adapter's
        // weights are read once for all the rows that share it, not once per row.
        let mut low = vec![0f32; n * rank];
        for (i, a) in w.a.chunks_exact(in_dim).enumerate() {
            for (r, x) in rows.x[..n * in_dim].chunks_exact(in_dim).enumerate() {
                low[r * rank + i] = w.scale * (k.dot)(a, x);
            }
        }
        for (r, low) in low.chunks_exact(rank).enumerate() {
            let out = &mut rows.out[r * rows.out_stride + rows.out_offset..][..w.out_dim];
            (k.gemv_t)(out, low, &l.bt, w.out_dim);
        }
    }

    fn weights_key(&self) -> Option<usize> {
        // An `AdapterWeights` is never zero-sized, so live ones have distinct addresses.
        Some(self as *const Self as usize)
    }

    fn prefix_kv(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        self.prefix
            .as_ref()?
            .layers
            .get(layer)
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TinySpec;

    fn lora(cfg: &ModelConfig, proj: Proj, rank: usize, seed: u32) -> LoraWeights {
        let (in_dim, out_dim) = proj_dims(cfg, proj);
        let val =
            |i: usize| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5;
        LoraWeights {
            a: (0..rank * in_dim).map(val).collect(),
            b: (0..out_dim * rank).map(|i| val(i + 7)).collect(),
            rank,
            in_dim,
            out_dim,
            scale: 0.75,
        }
    }

    #[test]
    fn delta_equals_the_definition() {
        let cfg = TinySpec::default().config();
        let w = lora(&cfg, Proj::Up, 3, 1);
        let adapter =
            AdapterWeights::new(&cfg, BTreeMap::from([((1, Proj::Up), w.clone())]), None).unwrap();
        let rows = 2;
        let x: Vec<f32> = (0..rows * w.in_dim)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        // A fused output row: 5 columns of something else, then this projection.
        let stride = w.out_dim + 5;
        let mut out = vec![1f32; rows * stride];
        adapter.add_delta(ProjRows {
            layer: 1,
            proj: Proj::Up,
            x: &x,
            in_dim: w.in_dim,
            out: &mut out,
            out_stride: stride,
            out_offset: 5,
            out_dim: w.out_dim,
            rows,
        });
        for r in 0..rows {
            for c in 0..5 {
                assert_eq!(out[r * stride + c], 1.0);
            }
            for j in 0..w.out_dim {
                let mut want = 0f64;
                for k in 0..w.rank {
                    let xa: f64 = (0..w.in_dim)
                        .map(|i| w.a[k * w.in_dim + i] as f64 * x[r * w.in_dim + i] as f64)
                        .sum();
                    want += w.b[j * w.rank + k] as f64 * xa;
                }
                let got = out[r * stride + 5 + j] as f64 - 1.0;
                assert!((got - 0.75 * want).abs() < 1e-4, "{got} vs {}", 0.75 * want);
            }
        }
        // Another layer or projection is untouched.
        let before = out.clone();
        adapter.add_delta(ProjRows {
            layer: 0,
            proj: Proj::Up,
            x: &x,
            in_dim: w.in_dim,
            out: &mut out,
            out_stride: stride,
            out_offset: 5,
            out_dim: w.out_dim,
            rows,
        });
        assert_eq!(out, before);
    }

    #[test]
    fn shapes_and_values_are_checked() {
        let cfg = TinySpec::default().config();
        let mut w = lora(&cfg, Proj::Q, 2, 3);
        let bad_layer = AdapterWeights::new(
            &cfg,
            BTreeMap::from([((cfg.num_layers, Proj::Q), w.clone())]),
            None,
        );
        assert!(matches!(bad_layer, Err(AdapterShapeError::Lora { .. })));
        let wrong_proj =
            AdapterWeights::new(&cfg, BTreeMap::from([((0, Proj::Down), w.clone())]), None);
        assert!(
            wrong_proj.is_err(),
            "a q-shaped pair on down_proj must be refused"
        );
        w.b[3] = f32::NAN;
        let nan = AdapterWeights::new(&cfg, BTreeMap::from([((0, Proj::Q), w)]), None);
        assert!(matches!(nan, Err(AdapterShapeError::NonFinite(_))));
        assert!(matches!(
            AdapterWeights::new(&cfg, BTreeMap::new(), None),
            Err(AdapterShapeError::Empty)
        ));
        let kv = cfg.kv_dim();
        let short = PrefixWeights {
            layers: vec![(vec![0.0; 2 * kv], vec![0.0; 2 * kv]); cfg.num_layers - 1],
            num_virtual_tokens: 2,
        };
        assert!(matches!(
            AdapterWeights::new(&cfg, BTreeMap::new(), Some(short)),
            Err(AdapterShapeError::Prefix(_))
        ));
    }
}
