//! [`TrainAdapter`]: the trainable LoRA and prefix parameters of one adapter, and the bridge
//! to serving: [`TrainAdapter::to_weights`] copies the `Var`s into the serving
//! [`AdapterWeights`], so what was trained is exactly what is served.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::error::TrainError;
use super::lora::{LoraConfig, LoraLayer};
use super::prefix::{PrefixConfig, PrefixLayer};
use crate::model::adapter::{proj_dims, LoraWeights, PrefixWeights};
use crate::model::{AdapterWeights, ModelConfig, Proj};

/// Trainable adapter parameters: LoRA pairs per (layer, projection) and/or a prefix per layer.
#[derive(Debug, Clone)]
pub struct TrainAdapter {
    lora: BTreeMap<(usize, Proj), LoraLayer>,
    prefix: Vec<PrefixLayer>,
    prefix_len: usize,
}

impl TrainAdapter {
    /// A freshly initialised adapter for `model` (PEFT initialisation: LoRA B = 0, so the
    /// LoRA part starts as the base model). At least one of `lora` and `prefix` is needed.
    pub fn new(
        model: &ModelConfig,
        lora: Option<&LoraConfig>,
        prefix: Option<&PrefixConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if lora.is_none() && prefix.is_none() {
            return Err(TrainError::AdapterConfig(
                "an adapter needs LoRA, a prefix, or both".into(),
            ));
        }
        let mut out = TrainAdapter {
            lora: BTreeMap::new(),
            prefix: Vec::new(),
            prefix_len: 0,
        };
        if let Some(cfg) = lora {
            cfg.validate()?;
            for layer in 0..model.num_layers {
                for &proj in &cfg.targets {
                    let dims = proj_dims(model, proj);
                    let l = LoraLayer::init(cfg, layer, proj, dims, dtype, device)?;
                    out.lora.insert((layer, proj), l);
                }
            }
        }
        if let Some(cfg) = prefix {
            cfg.validate()?;
            for layer in 0..model.num_layers {
                let p = PrefixLayer::init(cfg, layer, model.kv_dim(), dtype, device)?;
                out.prefix.push(p);
            }
            out.prefix_len = cfg.num_virtual_tokens;
        }
        Ok(out)
    }

    /// The LoRA pair of `proj` in `layer`, if targeted.
    pub fn lora(&self, layer: usize, proj: Proj) -> Option<&LoraLayer> {
        self.lora.get(&(layer, proj))
    }

    /// All LoRA pairs, ordered by (layer, projection).
    pub fn lora_layers(&self) -> impl Iterator<Item = (&(usize, Proj), &LoraLayer)> {
        self.lora.iter()
    }

    /// The prefix of `layer`, if the adapter has one.
    pub fn prefix(&self, layer: usize) -> Option<&PrefixLayer> {
        self.prefix.get(layer)
    }

    /// Virtual tokens per layer (0 without a prefix).
    pub fn prefix_len(&self) -> usize {
        self.prefix_len
    }

    /// Every trainable variable under its PEFT-style name (`model.layers.{l}.self_attn.q_proj
    /// .lora_A.weight`, `model.layers.{l}.prefix.key`, ...), for the optimiser and for saving.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (&(layer, proj), l) in &self.lora {
            let module = match proj {
                Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
                Proj::Gate | Proj::Up | Proj::Down => "mlp",
            };
            let stem = format!("model.layers.{layer}.{module}.{}", proj.module_name());
            out.push((format!("{stem}.lora_A.weight"), l.a.clone()));
            out.push((format!("{stem}.lora_B.weight"), l.b.clone()));
        }
        for (layer, p) in self.prefix.iter().enumerate() {
            out.push((format!("model.layers.{layer}.prefix.key"), p.k.clone()));
            out.push((format!("model.layers.{layer}.prefix.value"), p.v.clone()));
        }
        out
    }

    /// Every trainable variable, in the order of [`TrainAdapter::named_vars`].
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Copies the current values into the serving form, so what was trained is exactly what
    /// is served (and saved).
    pub fn to_weights(&self, model: &ModelConfig) -> Result<AdapterWeights, TrainError> {
        let mut lora = BTreeMap::new();
        for (&key, l) in &self.lora {
            let (rank, in_dim) = l.a.as_tensor().dims2()?;
            let (out_dim, _) = l.b.as_tensor().dims2()?;
            lora.insert(
                key,
                LoraWeights {
                    a: to_f32_vec(l.a.as_tensor())?,
                    b: to_f32_vec(l.b.as_tensor())?,
                    rank,
                    in_dim,
                    out_dim,
                    scale: l.scale as f32,
                },
            );
        }
        let prefix = if self.prefix.is_empty() {
            None
        } else {
            let layers = self
                .prefix
                .iter()
                .map(|p| Ok((to_f32_vec(p.k.as_tensor())?, to_f32_vec(p.v.as_tensor())?)))
                .collect::<Result<Vec<_>, TrainError>>()?;
            Some(PrefixWeights {
                layers,
                num_virtual_tokens: self.prefix_len,
            })
        };
        AdapterWeights::new(model, lora, prefix)
            .map_err(|e| TrainError::AdapterConfig(e.to_string()))
    }
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>, TrainError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
