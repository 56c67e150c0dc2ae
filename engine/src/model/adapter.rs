//! [`AdapterWeights`]: an adapter in the form the serving forward runs, plain f32 buffers behind
//! the [`AdapterHook`] seam. PEFT files (the adapters crate) and trained parameters
//! ([`crate::train::TrainAdapter::to_weights`]) both end up here, so what is trained, what is
//! uploaded and what is served are one representation.
//!
//! LoRA follows PEFT: `y = x Wᵀ + scale · (x Aᵀ) Bᵀ` with `A` `[r, in]`, `B` `[out, r]` and
//! `scale = alpha / r` (`alpha / √r` with rsLoRA). Prefix tuning gives each layer
//! `num_virtual_tokens` key and value rows that start every sequence's cache.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use super::config::ModelConfig;
use super::hooks::{AdapterHook, Proj, ProjRows};
use super::simd::{self, Q8Rows};

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

/// A LoRA pair prepared for the forward: both factors in 8-bit blocks for the int8 forward (the
/// default), where a decode step of many adapters is bound by the bytes of their weights and
/// reads a quarter of f32's; `Bᵀ` in f32 for the f32 forward, built on its first use there, so
/// that the second product is contiguous scaled adds.
#[derive(Debug, Clone)]
struct ServedLora {
    w: LoraWeights,
    /// `Bᵀ`, `[rank, out_dim]`.
    bt: OnceLock<Vec<f32>>,
    /// `A` in blocks along `in_dim`.
    a8: Q8Rows,
    /// `Bᵀ` in blocks along `out_dim`.
    bt8: Q8Rows,
}

/// LoRA factors as the int8 forward applies them: `A` (`[rank, in_dim]`) and `B`
/// (`[out_dim, rank]`) through 8-bit blocks of 32 along `A`'s rows and `B`'s columns, back to
/// f32. The training forward on a quantized base computes with these values (the gradient
/// passes straight through), so the adapter it optimises is the one served.
pub fn lora_int8_values(a: &[f32], b: &[f32], rank: usize) -> (Vec<f32>, Vec<f32>) {
    let bt8 = int8_rows(&transpose(b, rank), b.len() / rank);
    (
        int8_rows(a, a.len() / rank),
        transpose(&bt8, b.len() / rank),
    )
}

/// The rows (`cols` values each) of `m` through 8-bit blocks and back.
pub(crate) fn int8_rows(m: &[f32], cols: usize) -> Vec<f32> {
    Q8Rows::new(m, cols).dequantize()
}

/// The transpose of `m`, rows of `cols` values.
pub(crate) fn transpose(m: &[f32], cols: usize) -> Vec<f32> {
    let rows = m.len() / cols;
    let mut t = vec![0f32; m.len()];
    for (i, row) in m.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
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
            let a8 = Q8Rows::new(&w.a, in_dim);
            let bt8 = Q8Rows::new(&transpose(&w.b, w.rank), out_dim);
            let bt = OnceLock::new();
            served.insert((layer, proj), ServedLora { w, bt, a8, bt8 });
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

    /// Builds the f32 `Bᵀ` the f32 forward reads (that forward builds it on first use
    /// otherwise), so that [`Self::resident_bytes`] counts it from now on.
    pub fn prepare_f32(&self) {
        for s in self.lora.values() {
            s.bt.get_or_init(|| transpose(&s.w.b, s.w.rank));
        }
    }

    /// Bytes held in memory (weights, their 8-bit copies, prefix, and the f32 `Bᵀ` once built,
    /// see [`Self::prepare_f32`]).
    pub fn resident_bytes(&self) -> usize {
        let f32s = std::mem::size_of::<f32>();
        let lora: usize = self
            .lora
            .values()
            .map(|s| {
                let bt = s.bt.get().map_or(0, Vec::len);
                (s.w.a.len() + s.w.b.len() + bt) * f32s + s.a8.bytes() + s.bt8.bytes()
            })
            .sum();
        let prefix: usize = self
            .prefix
            .iter()
            .flat_map(|p| p.layers.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        lora + prefix * f32s
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
        let (rank, in_dim, out_dim, n) = (w.rank, w.in_dim, w.out_dim, rows.rows);
        let xs = &rows.x[..n * in_dim];
        let mut low = vec![0f32; n * rank];
        let out_row = |r: usize| r * rows.out_stride + rows.out_offset;
        if rows.int8 {
            // The 8-bit factors as they are, never widened in memory: a step of many adapters
            // reads a quarter of f32's bytes. Each `A` row meets every input row while in cache.
            for i in 0..rank {
                let (q, d) = l.a8.row(i);
                for (r, x) in xs.chunks_exact(in_dim).enumerate() {
                    low[r * rank + i] = w.scale * (k.dot_q8)(x, q, d);
                }
            }
            let (q, d) = l.bt8.parts();
            for (r, low) in low.chunks_exact(rank).enumerate() {
                (k.gemv_t_q8)(&mut rows.out[out_row(r)..][..out_dim], low, q, d);
            }
            return;
        }
        // `A` row by row, each against every input row while it is in cache: the adapter's
        // weights are read once for all the rows that share it, not once per row.
        for (i, a) in w.a.chunks_exact(in_dim).enumerate() {
            for (r, x) in xs.chunks_exact(in_dim).enumerate() {
                low[r * rank + i] = w.scale * (k.dot)(a, x);
            }
        }
        let bt = l.bt.get_or_init(|| transpose(&w.b, w.rank));
        for (r, low) in low.chunks_exact(rank).enumerate() {
            (k.gemv_t)(&mut rows.out[out_row(r)..][..out_dim], low, bt, out_dim);
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

    /// `adapter`'s delta for `rows` rows of `x` into rows of `stride` values, all ones before,
    /// with this projection's columns starting at 5.
    fn delta_rows(
        adapter: &AdapterWeights,
        layer: usize,
        w: &LoraWeights,
        x: &[f32],
        rows: usize,
        int8: bool,
    ) -> Vec<f32> {
        let stride = w.out_dim + 5;
        let mut out = vec![1f32; rows * stride];
        adapter.add_delta(ProjRows {
            layer,
            proj: Proj::Up,
            x,
            in_dim: w.in_dim,
            out: &mut out,
            out_stride: stride,
            out_offset: 5,
            out_dim: w.out_dim,
            rows,
            int8,
        });
        out
    }

    #[test]
    fn delta_equals_the_definition() {
        let cfg = TinySpec::default().config();
        let w = lora(&cfg, Proj::Up, 3, 1);
        let adapter =
            AdapterWeights::new(&cfg, BTreeMap::from([((1, Proj::Up), w.clone())]), None).unwrap();
        // The f32 `Bᵀ` is held (and counted) once the f32 forward needs it.
        let int8_bytes = adapter.resident_bytes();
        adapter.prepare_f32();
        assert_eq!(adapter.resident_bytes(), int8_bytes + w.b.len() * 4);
        let rows = 2;
        let x: Vec<f32> = (0..rows * w.in_dim)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let stride = w.out_dim + 5;
        // In f32 the factors as given; in int8 their 8-bit values (what the trainer uses).
        let (a8, b8) = lora_int8_values(&w.a, &w.b, w.rank);
        assert_ne!(a8, w.a, "the 8-bit values differ from the f32 ones");
        for (int8, a, b) in [(false, &w.a, &w.b), (true, &a8, &b8)] {
            let out = delta_rows(&adapter, 1, &w, &x, rows, int8);
            for r in 0..rows {
                // A fused output row: 5 columns of something else, then this projection.
                for c in 0..5 {
                    assert_eq!(out[r * stride + c], 1.0);
                }
                for j in 0..w.out_dim {
                    let mut want = 0f64;
                    for k in 0..w.rank {
                        let xa: f64 = (0..w.in_dim)
                            .map(|i| a[k * w.in_dim + i] as f64 * x[r * w.in_dim + i] as f64)
                            .sum();
                        want += b[j * w.rank + k] as f64 * xa;
                    }
                    let got = out[r * stride + 5 + j] as f64 - 1.0;
                    assert!((got - 0.75 * want).abs() < 1e-4, "{got} vs {}", 0.75 * want);
                }
                // A row alone (the one-row 8-bit kernels) gives the bits it gives in a group.
                let alone = delta_rows(&adapter, 1, &w, &x[r * w.in_dim..][..w.in_dim], 1, int8);
                assert_eq!(
                    alone[..],
                    out[r * stride..][..stride],
                    "int8 {int8} row {r}"
                );
            }
            // Another layer or projection is untouched.
            assert!(delta_rows(&adapter, 0, &w, &x, rows, int8)
                .iter()
                .all(|&v| v == 1.0));
        }
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
