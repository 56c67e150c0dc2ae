//! Hyper-parameters of a Llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`, and validated once so the forward can trust them.

use serde::Deserialize;

use crate::gguf::{GgufFile, GgufValue};

/// Largest number of positions a rotary table is built for up front.
const MAX_ROPE_TABLE: usize = 1 << 17;

/// Why a model configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2)")]
    Architecture(String),
    #[error("missing or invalid `{key}`")]
    Missing { key: String },
    #[error("inconsistent configuration: {0}")]
    Invalid(String),
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
}

/// The model families the forward implements; they differ only in details carried by fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1/2/3, SmolLM, Mistral (no sliding window support beyond the context length).
    Llama,
    /// Qwen2 / Qwen2.5: bias on q, k, v.
    Qwen2,
}

/// Llama 3 style frequency-dependent rope scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall factor (8 for Llama 3.1).
    pub factor: f32,
    /// Wavelengths longer than `original / low_freq_factor` are scaled fully.
    pub low_freq_factor: f32,
    /// Wavelengths shorter than `original / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// Context length the base model was trained with.
    pub original_max_position_embeddings: usize,
}

/// Validated model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture family.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Rotary base.
    pub rope_theta: f32,
    /// Optional Llama 3 rope scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Context length.
    pub max_position_embeddings: usize,
    /// Output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias.
    pub attention_bias: bool,
}

impl ModelConfig {
    /// Width of the key/value projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Number of rotary table rows to precompute.
    pub fn rope_table_len(&self) -> usize {
        self.max_position_embeddings.min(MAX_ROPE_TABLE)
    }

    /// Rotary inverse frequencies (`head_dim / 2` of them), with Llama 3 scaling applied.
    pub fn inv_freqs(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / self.head_dim as f64);
                match &self.rope_scaling {
                    None => f as f32,
                    Some(s) => llama3_scale(f, s) as f32,
                }
            })
            .collect()
    }

    /// Checks the relations the forward relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and num_layers must be positive".into());
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} must be above 1", self.rope_theta));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        // Guards against header values that would make the weights absurdly large.
        let limits = [
            (self.vocab_size, 1 << 22, "vocab_size"),
            (self.hidden_size, 1 << 16, "hidden_size"),
            (self.intermediate_size, 1 << 18, "intermediate_size"),
            (self.num_layers, 1 << 10, "num_layers"),
            (self.num_heads, 1 << 10, "num_heads"),
            (self.head_dim, 1 << 12, "head_dim"),
        ];
        for (value, max, name) in limits {
            if value > max {
                return bad(format!("{name} {value} exceeds {max}"));
            }
        }
        Ok(())
    }

    /// Reads the configuration from GGUF metadata (`<arch>.*` keys).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ConfigError> {
        let arch_name = file
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| ConfigError::Missing {
                key: "general.architecture".into(),
            })?
            .to_string();
        let arch = match arch_name.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(ConfigError::Architecture(other.to_string())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let get_u = |k: &str| -> Result<usize, ConfigError> {
            file.get(&key(k))
                .and_then(GgufValue::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| ConfigError::Missing { key: key(k) })
        };
        let get_f = |k: &str| file.get(&key(k)).and_then(GgufValue::as_f64);
        let hidden_size = get_u("embedding_length")?;
        let num_heads = get_u("attention.head_count")?;
        let num_kv_heads = get_u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = match get_u("attention.key_length") {
            Ok(d) => d,
            Err(_) if num_heads > 0 => hidden_size / num_heads,
            Err(e) => return Err(e),
        };
        let vocab_size = match get_u("vocab_size") {
            Ok(v) => v,
            Err(_) => file
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len())
                .ok_or_else(|| ConfigError::Missing {
                    key: key("vocab_size"),
                })?,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: get_u("feed_forward_length")?,
            num_layers: get_u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope_theta: get_f("rope.freq_base").unwrap_or(10_000.0) as f32,
            // Llama 3 GGUF files carry their scaling as a `rope_freqs.weight` tensor instead;
            // the weight loader applies it.
            rope_scaling: None,
            max_position_embeddings: get_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !file.tensors.contains_key("output.weight"),
            attention_bias: file.tensors.contains_key("blk.0.attn_q.bias"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let raw: HfConfig = serde_json::from_str(text)?;
        let arch = match raw.model_type.as_deref() {
            Some("llama") | Some("mistral") | None => Arch::Llama,
            Some("qwen2") => Arch::Qwen2,
            Some(other) => return Err(ConfigError::Architecture(other.to_string())),
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or_else(|| raw.hidden_size / raw.num_attention_heads.max(1));
        let rope_scaling = match raw.rope_scaling {
            Some(s) if s.rope_type.as_deref().or(s.kind.as_deref()) == Some("llama3") => {
                Some(Llama3RopeScaling {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                })
            }
            Some(s) => match s.rope_type.as_deref().or(s.kind.as_deref()) {
                Some("default") | None => None,
                Some(other) => {
                    return Err(ConfigError::Invalid(format!(
                        "rope_scaling type `{other}` is not supported"
                    )))
                }
            },
            None => None,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(arch == Arch::Qwen2),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let orig = s.original_max_position_embeddings as f64;
    let low_wavelen = orig / s.low_freq_factor as f64;
    let high_wavelen = orig / s.high_freq_factor as f64;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor as f64
    } else {
        let smooth = (orig / wavelen - s.low_freq_factor as f64)
            / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
        (1.0 - smooth) * freq / s.factor as f64 + smooth * freq
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
      "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
      "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
      "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
      "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
      "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 100000,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "vocab_size": 49152}"#;

    #[test]
    fn reads_smollm2_hf_config() {
        let c = ModelConfig::from_hf_json(SMOLLM2_CONFIG).expect("parse");
        assert_eq!(
            (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim),
            (576, 9, 3, 64)
        );
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert_eq!(c.rope_theta, 100000.0);
    }

    #[test]
    fn qwen2_defaults_to_attention_bias() {
        let text = SMOLLM2_CONFIG
            .replace("\"model_type\": \"llama\"", "\"model_type\": \"qwen2\"")
            .replace("\"attention_bias\": false,", "");
        let c = ModelConfig::from_hf_json(&text).expect("parse");
        assert_eq!(c.arch, Arch::Qwen2);
        assert!(c.attention_bias);
    }

    #[test]
    fn llama3_rope_scaling_matches_reference_values() {
        // Reference: transformers' `_compute_llama3_parameters` with Llama 3.1 8B settings.
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let high = 1.0 / 500000f64.powf(0.0);
        assert_eq!(llama3_scale(high, &s), high);
        let low = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((llama3_scale(low, &s) - low / 8.0).abs() < 1e-15);
    }

    #[test]
    fn rejects_heads_that_do_not_group() {
        let text =
            SMOLLM2_CONFIG.replace("\"num_key_value_heads\": 3", "\"num_key_value_heads\": 4");
        let err = ModelConfig::from_hf_json(&text)
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("cannot be grouped"), "{err}");
    }

    #[test]
    fn rejects_unknown_architecture() {
        let text =
            SMOLLM2_CONFIG.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"");
        assert!(matches!(
            ModelConfig::from_hf_json(&text),
            Err(ConfigError::Architecture(_))
        ));
    }
}
