//! LoRA parameters for the training forward: `y = x Wᵀ + scale · (x Aᵀ) Bᵀ` per projection,
//! initialised as PEFT does (A Kaiming-uniform, B zero) so a fresh adapter is the base model.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::TrainError;
use super::fused::LoraDelta;
use crate::model::adapter::{int8_rows, transpose};
use crate::model::Proj;

/// Shape and initialisation of the LoRA part of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`; the delta is scaled by `alpha / r` (or `alpha / √r` with `rslora`).
    pub alpha: f64,
    /// Rank-stabilised scaling (`use_rslora` in PEFT).
    pub rslora: bool,
    /// Projections that get a LoRA pair, in every layer.
    pub targets: Vec<Proj>,
    /// Seed of the A initialisation; the same seed gives the same adapter.
    pub seed: u64,
}

impl LoraConfig {
    /// The factor the low-rank product is multiplied by.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    pub(crate) fn validate(&self) -> Result<(), TrainError> {
        if self.rank == 0 {
            return Err(TrainError::AdapterConfig(
                "LoRA rank must be positive".into(),
            ));
        }
        if !self.alpha.is_finite() {
            return Err(TrainError::AdapterConfig(format!(
                "lora_alpha {} must be finite",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(TrainError::AdapterConfig(
                "LoRA needs at least one target projection".into(),
            ));
        }
        Ok(())
    }
}

/// The trainable pair of one projection in one layer.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// `lora_A.weight`, `[r, in_features]`.
    pub a: Var,
    /// `lora_B.weight`, `[out_features, r]`.
    pub b: Var,
    /// `alpha / r` (or `alpha / √r`).
    pub scale: f64,
}

impl LoraLayer {
    /// A PEFT-initialised pair: `A ~ U(−1/√in, 1/√in)` (what `kaiming_uniform_(a=√5)` gives),
    /// `B = 0`. The stream is seeded per (seed, layer, projection), so which other modules are
    /// targeted does not change this one's initial values.
    pub(crate) fn init(
        cfg: &LoraConfig,
        layer: usize,
        proj: Proj,
        dims: (usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let (in_dim, out_dim) = dims;
        let stream = (layer as u64) << 8 | proj as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(stream);
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f64> = (0..cfg.rank * in_dim)
            .map(|_| rng.gen_range(-bound..bound))
            .collect();
        let a = Tensor::from_vec(a, (cfg.rank, in_dim), device)?.to_dtype(dtype)?;
        Ok(LoraLayer {
            a: Var::from_tensor(&a)?,
            b: Var::zeros((out_dim, cfg.rank), dtype, device)?,
            scale: cfg.scale(),
        })
    }

    /// `scale · (x Aᵀ) Bᵀ` for `x` `[rows, in_features]` (one fused op on the CPU). With
    /// `int8` the factors enter with the 8-bit values the int8 serving forward applies
    /// ([`crate::model::adapter::lora_int8_values`]), their gradients passing straight
    /// through to the f32 parameters.
    pub fn delta(&self, x: &Tensor, int8: bool) -> Result<Tensor, TrainError> {
        let (a, b) = self.factors(int8)?;
        if x.device().is_cpu() {
            let op = LoraDelta { scale: self.scale };
            return Ok(x.contiguous()?.apply_op3(&a, &b, op)?);
        }
        let low = x.matmul(&a.t()?)?;
        Ok(low.matmul(&b.t()?)?.affine(self.scale, 0.0)?)
    }
}

impl LoraLayer {
    /// `A` and `B` as the forward multiplies them: with `int8`, their 8-bit values.
    pub(crate) fn factors(&self, int8: bool) -> Result<(Tensor, Tensor), TrainError> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        if !int8 {
            return Ok((a.clone(), b.clone()));
        }
        Ok((
            a.contiguous()?
                .apply_op1(Int8Blocks { along_cols: false })?,
            // `B`'s blocks run along its columns (rows of `Bᵀ`, which the server keeps).
            b.contiguous()?.apply_op1(Int8Blocks { along_cols: true })?,
        ))
    }
}

/// A matrix through 8-bit blocks and back (f32 on the CPU), the blocks running along its rows
/// or (`along_cols`) along its columns; the identity backward.
struct Int8Blocks {
    along_cols: bool,
}

impl CustomOp1 for Int8Blocks {
    fn name(&self) -> &'static str {
        "lora-int8-blocks"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(v), Some((start, end)), &[rows, cols]) =
            (storage, layout.contiguous_offsets(), layout.dims())
        else {
            candle_core::bail!("int8 LoRA values need a contiguous f32 matrix");
        };
        let v = &v[start..end];
        let values = if rows == 0 || cols == 0 {
            Vec::new()
        } else if self.along_cols {
            let t = transpose(v, cols);
            transpose(&int8_rows(&t, rows), rows)
        } else {
            int8_rows(v, cols)
        };
        Ok((CpuStorage::F32(values), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}
