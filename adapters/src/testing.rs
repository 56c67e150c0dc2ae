//! Random adapters for tests and benchmarks (not for serving): seeded, uniform values, any
//! targets and rank on any model shape.

use std::collections::BTreeMap;

use prefix_rft_engine::model::adapter::proj_dims;
use prefix_rft_engine::model::{LoraWeights, ModelConfig, PrefixWeights, Proj};
use rand::{Rng, SeedableRng};

/// LoRA pairs of rank `rank` on `targets` in every layer, values uniform in `±range`, with
/// delta scale `scale`.
pub fn random_lora(
    cfg: &ModelConfig,
    seed: u64,
    rank: usize,
    targets: &[Proj],
    range: f32,
    scale: f32,
) -> BTreeMap<(usize, Proj), LoraWeights> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pairs = BTreeMap::new();
    for layer in 0..cfg.num_layers {
        for &p in targets {
            let (i, o) = proj_dims(cfg, p);
            pairs.insert(
                (layer, p),
                LoraWeights {
                    a: (0..rank * i)
                        .map(|_| rng.gen_range(-range..range))
                        .collect(),
                    b: (0..o * rank)
                        .map(|_| rng.gen_range(-range..range))
                        .collect(),
                    rank,
                    in_dim: i,
                    out_dim: o,
                    scale,
                },
            );
        }
    }
    pairs
}

/// A prefix of `n` virtual tokens, keys uniform in `±key_range`, values in `±value_range`.
pub fn random_prefix(
    cfg: &ModelConfig,
    seed: u64,
    n: usize,
    key_range: f32,
    value_range: f32,
) -> PrefixWeights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let len = n * cfg.kv_dim();
    let layers = (0..cfg.num_layers)
        .map(|_| {
            (
                (0..len)
                    .map(|_| rng.gen_range(-key_range..key_range))
                    .collect(),
                (0..len)
                    .map(|_| rng.gen_range(-value_range..value_range))
                    .collect(),
            )
        })
        .collect();
    PrefixWeights {
        layers,
        num_virtual_tokens: n,
    }
}
