//! PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, read into the
//! engine's [`AdapterWeights`] with every check a hostile upload needs, and written back so
//! Python PEFT loads them unchanged.
//!
//! What is read (PEFT's `save_pretrained` layout):
//! - LoRA (`peft_type: "LORA"`): `r`, `lora_alpha`, `use_rslora`, `target_modules` (a list,
//!   `"all-linear"`, or a regex string) and tensors
//!   `base_model.model.model.layers.{N}.{self_attn|mlp}.{module}.lora_{A|B}.weight`, `A`
//!   `[r, in]`, `B` `[out, r]`; delta scale `lora_alpha / r` (`/ √r` with rsLoRA).
//! - Prefix tuning (`peft_type: "PREFIX_TUNING"`): `num_virtual_tokens` and one tensor
//!   `prompt_embeddings` `[num_virtual_tokens, num_layers · 2 · kv_dim]`. Row `t` holds, for
//!   layer `l`, the virtual key in columns `[2l·kv_dim, (2l+1)·kv_dim)` and the value in the
//!   next `kv_dim` columns (PEFT views it as `[t, layers·2, kv_heads, head_dim]` and splits
//!   key/value pairs per layer). Keys are used as stored, without rotary.
//! - Both in one adapter (our extension): a LoRA config with `"prefix_rft": {
//!   "num_virtual_tokens": N}` and `prompt_embeddings` next to the LoRA tensors. PEFT itself
//!   loads only the LoRA part of such a file.
//!
//! Refused with a reason: DoRA, LoRA bias, `modules_to_save`, `fan_in_fan_out`, per-module
//! rank or alpha patterns, prefix projection MLPs, modules other than the seven projections,
//! shapes that do not fit the base, non-finite values, and anything over the [`Limits`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use prefix_rft_engine::model::adapter::proj_dims;
use prefix_rft_engine::model::{AdapterWeights, LoraWeights, ModelConfig, PrefixWeights, Proj};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::AdapterError;

/// PEFT's config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Bounds an adapter must stay within (from `[adapters]` in config.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest LoRA rank.
    pub max_rank: usize,
    /// Largest `adapter_model.safetensors`, in bytes.
    pub max_file_bytes: u64,
    /// Most prefix virtual tokens.
    pub max_virtual_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rank: 128,
            max_file_bytes: 512 << 20,
            max_virtual_tokens: 256,
        }
    }
}

/// What an adapter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AdapterKind {
    /// LoRA pairs only.
    #[serde(rename = "lora")]
    Lora,
    /// A prefix only.
    #[serde(rename = "prefix")]
    Prefix,
    /// Both.
    #[serde(rename = "lora+prefix")]
    LoraPrefix,
}

impl AdapterKind {
    /// The kind of `weights`.
    pub fn of(weights: &AdapterWeights) -> AdapterKind {
        match (weights.lora().next().is_some(), weights.prefix().is_some()) {
            (true, true) => AdapterKind::LoraPrefix,
            (false, true) => AdapterKind::Prefix,
            _ => AdapterKind::Lora,
        }
    }
}

/// The LoRA hyper-parameters of a file, as written in its config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParams {
    /// Rank.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// Targeted projections.
    pub targets: Vec<Proj>,
}

impl LoraParams {
    /// The delta's scale factor.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Whether `alpha / r` (`alpha / √r` with rsLoRA) is a finite f32, as the forward uses it.
pub fn lora_scale_fits(alpha: f64, rank: usize, rslora: bool) -> bool {
    let scale = LoraParams {
        rank,
        alpha,
        rslora,
        targets: Vec::new(),
    }
    .scale();
    (scale as f32).is_finite()
}

/// A validated adapter: weights ready to serve plus what its config said.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// Serving weights.
    pub weights: AdapterWeights,
    /// LoRA parameters, when it has LoRA.
    pub lora: Option<LoraParams>,
    /// Virtual tokens, when it has a prefix.
    pub num_virtual_tokens: Option<usize>,
}

impl PeftAdapter {
    /// What it carries.
    pub fn kind(&self) -> AdapterKind {
        AdapterKind::of(&self.weights)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(#[allow(dead_code)] String),
}

#[derive(Debug, Deserialize)]
struct PrefixExt {
    num_virtual_tokens: usize,
}

/// The fields of `adapter_config.json` we read; others are ignored as PEFT ignores them.
#[derive(Debug, Deserialize)]
struct RawConfig {
    peft_type: String,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    use_rslora: bool,
    target_modules: Option<TargetModules>,
    bias: Option<String>,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    modules_to_save: Option<Value>,
    rank_pattern: Option<BTreeMap<String, Value>>,
    alpha_pattern: Option<BTreeMap<String, Value>>,
    num_virtual_tokens: Option<usize>,
    num_layers: Option<usize>,
    token_dim: Option<usize>,
    num_transformer_submodules: Option<usize>,
    prefix_rft: Option<PrefixExt>,
}

fn invalid(msg: impl Into<String>) -> AdapterError {
    AdapterError::Invalid(msg.into())
}

/// Reads and validates an adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
pub fn load_dir(
    dir: &Path,
    model: &ModelConfig,
    limits: &Limits,
) -> Result<PeftAdapter, AdapterError> {
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    let config = read_bounded(&config_path, 1 << 20)?;
    let weights = read_bounded(&weights_path, limits.max_file_bytes)?;
    parse(&config, &weights, model, limits)
}

/// Reads a file of at most `max` bytes; a larger one is refused before it is read.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, AdapterError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => invalid(format!("{} is missing", file_name(path))),
        _ => AdapterError::Io {
            path: path.into(),
            source: e,
        },
    })?;
    if !meta.is_file() {
        return Err(invalid(format!(
            "{} is not a regular file",
            file_name(path)
        )));
    }
    if meta.len() > max {
        return Err(AdapterError::TooLarge(format!(
            "{} is {} bytes, the limit is {max}",
            file_name(path),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(AdapterError::io(path))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Validates the two files' contents against `model` and `limits`.
pub fn parse(
    config: &[u8],
    weights: &[u8],
    model: &ModelConfig,
    limits: &Limits,
) -> Result<PeftAdapter, AdapterError> {
    let raw: RawConfig =
        serde_json::from_slice(config).map_err(|e| invalid(format!("{CONFIG_FILE}: {e}")))?;
    if weights.len() as u64 > limits.max_file_bytes {
        return Err(AdapterError::TooLarge(format!(
            "{WEIGHTS_FILE} is {} bytes, the limit is {}",
            weights.len(),
            limits.max_file_bytes
        )));
    }
    let tensors =
        SafeTensors::deserialize(weights).map_err(|e| invalid(format!("{WEIGHTS_FILE}: {e}")))?;
    let explicit_targets = matches!(raw.target_modules, Some(TargetModules::List(_)));
    let (mut lora_params, want_prefix) = match raw.peft_type.as_str() {
        "LORA" => (
            Some(lora_params(&raw, limits)?),
            raw.prefix_rft.as_ref().map(|p| p.num_virtual_tokens),
        ),
        "PREFIX_TUNING" => (None, Some(prefix_params(&raw, model)?)),
        other => {
            return Err(invalid(format!(
                "peft_type {other:?} is not supported (LORA or PREFIX_TUNING)"
            )))
        }
    };
    if let Some(n) = want_prefix {
        if n == 0 || n > limits.max_virtual_tokens {
            return Err(invalid(format!(
                "num_virtual_tokens {n} is outside 1..={}",
                limits.max_virtual_tokens
            )));
        }
    }

    let mut a_of: BTreeMap<(usize, Proj), (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut b_of: BTreeMap<(usize, Proj), (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let mut prompt: Option<(Vec<usize>, Vec<f32>)> = None;
    for (name, view) in tensors.tensors() {
        let values = to_f32(&name, view.dtype(), view.data())?;
        let shape = view.shape().to_vec();
        if name == "prompt_embeddings" {
            prompt = Some((shape, values));
            continue;
        }
        let Some((layer, proj, which)) = parse_lora_key(&name) else {
            return Err(invalid(format!("unexpected tensor {name:?}")));
        };
        let map = if which == 'A' { &mut a_of } else { &mut b_of };
        map.insert((layer, proj), (shape, values));
    }

    let mut lora = BTreeMap::new();
    if let Some(p) = &mut lora_params {
        if !explicit_targets {
            p.targets = a_of
                .keys()
                .map(|&(_, proj)| proj)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
        }
        let scale = p.scale() as f32;
        for ((layer, proj), (a_shape, a)) in a_of {
            let ctx = format!("layer {layer} {}", proj.module_name());
            if !p.targets.contains(&proj) {
                return Err(invalid(format!(
                    "{ctx}: weights for a module that target_modules does not list"
                )));
            }
            let Some((b_shape, b)) = b_of.remove(&(layer, proj)) else {
                return Err(invalid(format!("{ctx}: lora_A without lora_B")));
            };
            if layer >= model.num_layers {
                return Err(invalid(format!(
                    "{ctx}: the base model has {} layers",
                    model.num_layers
                )));
            }
            let (in_dim, out_dim) = proj_dims(model, proj);
            if a_shape != [p.rank, in_dim] || b_shape != [out_dim, p.rank] {
                return Err(invalid(format!(
                    "{ctx}: lora_A {a_shape:?} and lora_B {b_shape:?} do not fit r={} on a \
                     {in_dim}→{out_dim} projection (expected [{}, {in_dim}] and [{out_dim}, {}])",
                    p.rank, p.rank, p.rank
                )));
            }
            lora.insert(
                (layer, proj),
                LoraWeights {
                    a,
                    b,
                    rank: p.rank,
                    in_dim,
                    out_dim,
                    scale,
                },
            );
        }
        if let Some((layer, proj)) = b_of.keys().next() {
            return Err(invalid(format!(
                "layer {layer} {}: lora_B without lora_A",
                proj.module_name()
            )));
        }
        let present: BTreeSet<Proj> = lora.keys().map(|&(_, p)| p).collect();
        if let Some(missing) = p.targets.iter().find(|t| !present.contains(t)) {
            return Err(invalid(format!(
                "target_modules lists {} but the weights hold no LoRA pair for it",
                missing.module_name()
            )));
        }
    } else if !a_of.is_empty() || !b_of.is_empty() {
        return Err(invalid("LoRA tensors in a PREFIX_TUNING adapter"));
    }

    let prefix = match (want_prefix, prompt) {
        (Some(n), Some((shape, values))) => Some(split_prompt(model, n, &shape, values)?),
        (Some(_), None) => return Err(invalid("prompt_embeddings is missing")),
        (None, Some(_)) => {
            return Err(invalid(
                "prompt_embeddings in a LoRA adapter whose config declares no prefix",
            ))
        }
        (None, None) => None,
    };
    let weights = AdapterWeights::new(model, lora, prefix).map_err(|e| invalid(e.to_string()))?;
    Ok(PeftAdapter {
        weights,
        lora: lora_params,
        num_virtual_tokens: want_prefix,
    })
}

fn lora_params(raw: &RawConfig, limits: &Limits) -> Result<LoraParams, AdapterError> {
    if raw.use_dora {
        return Err(invalid("DoRA (use_dora) is not supported"));
    }
    if raw.fan_in_fan_out {
        return Err(invalid("fan_in_fan_out is not supported (Conv1D models)"));
    }
    if raw.bias.as_deref().is_some_and(|b| b != "none") {
        return Err(invalid(
            "LoRA bias is not supported (bias must be \"none\")",
        ));
    }
    if raw.modules_to_save.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(invalid("modules_to_save is not supported"));
    }
    if raw.rank_pattern.as_ref().is_some_and(|m| !m.is_empty())
        || raw.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(invalid(
            "per-module rank_pattern / alpha_pattern are not supported",
        ));
    }
    let rank = raw.r.ok_or_else(|| invalid("LoRA config without r"))?;
    if rank == 0 || rank > limits.max_rank {
        return Err(invalid(format!(
            "rank {rank} is outside 1..={} (the configured limit)",
            limits.max_rank
        )));
    }
    let alpha = raw.lora_alpha.unwrap_or(8.0);
    if !alpha.is_finite() {
        return Err(invalid("lora_alpha is not finite"));
    }
    if !lora_scale_fits(alpha, rank, raw.use_rslora) {
        return Err(invalid(format!(
            "lora_alpha {alpha} gives a delta scale beyond f32's range"
        )));
    }
    let targets = match &raw.target_modules {
        None => return Err(invalid("LoRA config without target_modules")),
        Some(TargetModules::List(list)) => {
            let mut t = Vec::new();
            for m in list {
                let p = Proj::from_module_name(m).ok_or_else(|| {
                    invalid(format!(
                        "unknown target module {m:?}; supported: q_proj, k_proj, v_proj, \
                         o_proj, gate_proj, up_proj, down_proj"
                    ))
                })?;
                if !t.contains(&p) {
                    t.push(p);
                }
            }
            if t.is_empty() {
                return Err(invalid("target_modules is empty"));
            }
            t
        }
        // "all-linear" or a regex: the weights say which modules (they are checked to be
        // among the seven projections when their names are parsed); `parse` narrows this.
        Some(TargetModules::One(_)) => Vec::new(),
    };
    Ok(LoraParams {
        rank,
        alpha,
        rslora: raw.use_rslora,
        targets,
    })
}

fn prefix_params(raw: &RawConfig, model: &ModelConfig) -> Result<usize, AdapterError> {
    let n = raw
        .num_virtual_tokens
        .ok_or_else(|| invalid("PREFIX_TUNING config without num_virtual_tokens"))?;
    if let Some(l) = raw.num_layers {
        if l != model.num_layers {
            return Err(invalid(format!(
                "num_layers {l} but the base model has {}",
                model.num_layers
            )));
        }
    }
    if let Some(d) = raw.token_dim {
        if d != model.kv_dim() && d != model.hidden_size {
            return Err(invalid(format!(
                "token_dim {d} fits neither the key/value width {} nor the hidden size {}",
                model.kv_dim(),
                model.hidden_size
            )));
        }
    }
    if raw.num_transformer_submodules.is_some_and(|s| s != 1) {
        return Err(invalid(
            "num_transformer_submodules must be 1 for a decoder-only model",
        ));
    }
    Ok(n)
}

/// `base_model.model.model.layers.{N}.{self_attn|mlp}.{module}.lora_{A|B}.weight`.
fn parse_lora_key(name: &str) -> Option<(usize, Proj, char)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (group, rest) = rest.split_once('.')?;
    let (module, rest) = rest.split_once('.')?;
    let proj = Proj::from_module_name(module)?;
    let expected_group = match proj {
        Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
        Proj::Gate | Proj::Up | Proj::Down => "mlp",
    };
    if group != expected_group {
        return None;
    }
    match rest {
        "lora_A.weight" => Some((layer, proj, 'A')),
        "lora_B.weight" => Some((layer, proj, 'B')),
        _ => None,
    }
}

fn to_f32(name: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, AdapterError> {
    let out: Vec<f32> = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(invalid(format!(
                "{name}: dtype {other:?} is not supported (F32, F16, BF16)"
            )))
        }
    };
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!("{name}: value {i} is not finite")));
    }
    Ok(out)
}

fn split_prompt(
    model: &ModelConfig,
    n: usize,
    shape: &[usize],
    values: Vec<f32>,
) -> Result<PrefixWeights, AdapterError> {
    let kv = model.kv_dim();
    let width = model.num_layers * 2 * kv;
    if shape != [n, width] {
        return Err(invalid(format!(
            "prompt_embeddings is {shape:?}, expected [{n}, {width}] (num_virtual_tokens × \
             num_layers·2·kv_heads·head_dim)"
        )));
    }
    let layers = (0..model.num_layers)
        .map(|l| {
            let block = |j: usize| -> Vec<f32> {
                (0..n)
                    .flat_map(|t| {
                        let start = t * width + j * kv;
                        values[start..start + kv].iter().copied()
                    })
                    .collect()
            };
            (block(2 * l), block(2 * l + 1))
        })
        .collect();
    Ok(PrefixWeights {
        layers,
        num_virtual_tokens: n,
    })
}

/// The two PEFT files of an adapter, as bytes.
#[derive(Debug, Clone)]
pub struct PeftFiles {
    /// `adapter_config.json`.
    pub config: Vec<u8>,
    /// `adapter_model.safetensors`.
    pub weights: Vec<u8>,
}

/// Writes `weights` as PEFT files for the base model `base_model` (its name or path, as
/// `base_model_name_or_path`). LoRA pairs must share one rank and scale, as the adapters we
/// create and train do; the scale is written as `lora_alpha = scale · r`.
pub fn to_files(
    weights: &AdapterWeights,
    model: &ModelConfig,
    base_model: &str,
) -> Result<PeftFiles, AdapterError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut config = serde_json::Map::new();
    let lora: Vec<_> = weights.lora().collect();
    if let Some((_, first)) = lora.first() {
        let (rank, scale) = (first.rank, first.scale);
        if lora.iter().any(|(_, l)| l.rank != rank || l.scale != scale) {
            return Err(invalid(
                "LoRA pairs of different ranks or scales cannot be exported",
            ));
        }
        let targets: Vec<&str> = weights.targets().iter().map(|p| p.module_name()).collect();
        config.extend(
            json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": scale as f64 * rank as f64,
                "use_rslora": false,
                "target_modules": targets,
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": false,
                "use_dora": false,
                "modules_to_save": null,
                "init_lora_weights": true,
                "inference_mode": true,
            })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        );
        for ((layer, proj), l) in &lora {
            let group = match proj {
                Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
                Proj::Gate | Proj::Up | Proj::Down => "mlp",
            };
            let stem = format!(
                "base_model.model.model.layers.{layer}.{group}.{}",
                proj.module_name()
            );
            tensors.push((
                format!("{stem}.lora_A.weight"),
                vec![l.rank, l.in_dim],
                f32_bytes(&l.a),
            ));
            tensors.push((
                format!("{stem}.lora_B.weight"),
                vec![l.out_dim, l.rank],
                f32_bytes(&l.b),
            ));
        }
    }
    if let Some(p) = weights.prefix() {
        let kv = model.kv_dim();
        let width = model.num_layers * 2 * kv;
        let mut emb = vec![0f32; p.num_virtual_tokens * width];
        for (l, (k, v)) in p.layers.iter().enumerate() {
            for t in 0..p.num_virtual_tokens {
                let row = t * width;
                emb[row + 2 * l * kv..][..kv].copy_from_slice(&k[t * kv..(t + 1) * kv]);
                emb[row + (2 * l + 1) * kv..][..kv].copy_from_slice(&v[t * kv..(t + 1) * kv]);
            }
        }
        tensors.push((
            "prompt_embeddings".into(),
            vec![p.num_virtual_tokens, width],
            f32_bytes(&emb),
        ));
        if config.is_empty() {
            config.extend(
                json!({
                    "peft_type": "PREFIX_TUNING",
                    "task_type": "CAUSAL_LM",
                    "num_virtual_tokens": p.num_virtual_tokens,
                    "num_layers": model.num_layers,
                    "token_dim": kv,
                    "num_attention_heads": model.num_kv_heads,
                    "num_transformer_submodules": 1,
                    "prefix_projection": false,
                    "inference_mode": true,
                })
                .as_object()
                .cloned()
                .unwrap_or_default(),
            );
        } else {
            config.insert(
                "prefix_rft".into(),
                json!({"num_virtual_tokens": p.num_virtual_tokens}),
            );
        }
    }
    config.insert("base_model_name_or_path".into(), json!(base_model));
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| invalid(format!("{n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let weights = safetensors::serialize(views, &metadata)
        .map_err(|e| invalid(format!("serialising {WEIGHTS_FILE}: {e}")))?;
    let mut config = serde_json::to_vec_pretty(&Value::Object(config))
        .map_err(|e| invalid(format!("serialising {CONFIG_FILE}: {e}")))?;
    config.push(b'\n');
    Ok(PeftFiles { config, weights })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
