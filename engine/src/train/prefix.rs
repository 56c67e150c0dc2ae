//! Prefix-tuning parameters: per layer, `num_virtual_tokens` key and value rows that every
//! sequence attends to before its own tokens. As in PEFT and the serving KV cache, the virtual
//! keys are used as they are (no rotary), and real tokens' positions start after them.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::TrainError;

/// Shape and initialisation of the prefix part of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixConfig {
    /// Virtual tokens per layer.
    pub num_virtual_tokens: usize,
    /// Standard deviation of the normal initialisation (PEFT's `nn.Embedding` uses 1).
    pub init_std: f64,
    /// Seed of the initialisation.
    pub seed: u64,
}

impl PrefixConfig {
    pub(crate) fn validate(&self) -> Result<(), TrainError> {
        if self.num_virtual_tokens == 0 {
            return Err(TrainError::AdapterConfig(
                "prefix tuning needs at least one virtual token".into(),
            ));
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return Err(TrainError::AdapterConfig(format!(
                "prefix init_std {} must be finite and non-negative",
                self.init_std
            )));
        }
        Ok(())
    }
}

/// The trainable virtual keys and values of one layer, `[num_virtual_tokens, kv_dim]` each.
#[derive(Debug, Clone)]
pub struct PrefixLayer {
    /// Virtual keys (used without rotary).
    pub k: Var,
    /// Virtual values.
    pub v: Var,
}

impl PrefixLayer {
    /// Normal(0, `init_std`) keys and values, seeded per (seed, layer).
    pub(crate) fn init(
        cfg: &PrefixConfig,
        layer: usize,
        kv_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(layer as u64);
        let n = cfg.num_virtual_tokens;
        let mut normal = |len: usize| -> Result<Var, TrainError> {
            let v: Vec<f64> = (0..len)
                .map(|_| {
                    // Box-Muller: two uniforms give one standard normal.
                    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
                    let u2: f64 = rng.gen();
                    cfg.init_std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect();
            let t = Tensor::from_vec(v, (n, kv_dim), device)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&t)?)
        };
        Ok(PrefixLayer {
            k: normal(n * kv_dim)?,
            v: normal(n * kv_dim)?,
        })
    }
}
