//! Helpers shared by the engine's tests: where the real model is, tiny random models written
//! both as GGUF and as a Hugging Face safetensors directory, so unit tests run in milliseconds
//! on real loading code, and random adapters (seeded, uniform values, any targets and rank on
//! any model shape) for tests and benchmarks, never for serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};

use crate::gguf::{GgufValue, GgufWriter};
use crate::model::{LoraWeights, ModelConfig, PrefixWeights, Proj};
use crate::quant::GgmlDType;

/// The default model file; the test command (`scripts/test`) fetches it before running tests.
pub fn default_model_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model (scripts/test does this for you)",
        path.display()
    );
    path
}

/// Shape of a tiny test model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    /// Vocabulary.
    pub vocab: usize,
    /// Hidden width (a multiple of 32 so block formats apply).
    pub hidden: usize,
    /// MLP width (a multiple of 32).
    pub intermediate: usize,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Tie the output head to the embedding.
    pub tied: bool,
    /// Add q/k/v biases (Qwen2 style).
    pub bias: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            vocab: 96,
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            tied: false,
            bias: false,
        }
    }
}

impl TinySpec {
    /// The Hugging Face `config.json` of this shape.
    pub fn hf_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "llama", "vocab_size": self.vocab, "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "tie_word_embeddings": self.tied, "attention_bias": self.bias,
        })
    }

    /// The model configuration of this shape.
    pub fn config(&self) -> crate::model::ModelConfig {
        crate::model::ModelConfig::from_hf_json(&self.hf_config_json().to_string())
            .expect("tiny config")
    }
}

/// Random weights under Hugging Face names: `(name, shape, values)`, shape `[rows, cols]` or `[n]`.
pub fn tiny_weights(spec: &TinySpec, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = Vec::new();
    let hd = spec.hidden / spec.heads;
    let mut mat = |name: String, rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.gen_range(-scale..scale))
            .collect();
        (name, vec![rows, cols], v)
    };
    t.push(mat(
        "model.embed_tokens.weight".into(),
        spec.vocab,
        spec.hidden,
        1.0,
    ));
    for l in 0..spec.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let s = 1.0 / (spec.hidden as f32).sqrt() * 1.7;
        t.push(mat(
            p("self_attn.q_proj.weight"),
            spec.heads * hd,
            spec.hidden,
            s,
        ));
        t.push(mat(
            p("self_attn.k_proj.weight"),
            spec.kv_heads * hd,
            spec.hidden,
            s,
        ));
        t.push(mat(
            p("self_attn.v_proj.weight"),
            spec.kv_heads * hd,
            spec.hidden,
            s,
        ));
        t.push(mat(
            p("self_attn.o_proj.weight"),
            spec.hidden,
            spec.heads * hd,
            s,
        ));
        t.push(mat(
            p("mlp.gate_proj.weight"),
            spec.intermediate,
            spec.hidden,
            s,
        ));
        t.push(mat(
            p("mlp.up_proj.weight"),
            spec.intermediate,
            spec.hidden,
            s,
        ));
        t.push(mat(
            p("mlp.down_proj.weight"),
            spec.hidden,
            spec.intermediate,
            1.0 / (spec.intermediate as f32).sqrt(),
        ));
        if spec.bias {
            t.push(mat(p("self_attn.q_proj.bias"), 1, spec.heads * hd, 0.5));
            t.push(mat(p("self_attn.k_proj.bias"), 1, spec.kv_heads * hd, 0.5));
            t.push(mat(p("self_attn.v_proj.bias"), 1, spec.kv_heads * hd, 0.5));
        }
        t.push(mat(p("input_layernorm.weight"), 1, spec.hidden, 1.0));
        t.push(mat(
            p("post_attention_layernorm.weight"),
            1,
            spec.hidden,
            1.0,
        ));
    }
    t.push(mat("model.norm.weight".into(), 1, spec.hidden, 1.0));
    if !spec.tied {
        t.push(mat("lm_head.weight".into(), spec.vocab, spec.hidden, 0.3));
    }
    for (name, shape, v) in t.iter_mut() {
        if name.ends_with("norm.weight") {
            // Norm weights near 1, as in trained models.
            v.iter_mut().for_each(|x| *x = 1.0 + 0.2 * *x);
        }
        if shape[0] == 1 {
            *shape = vec![shape[1]];
        }
    }
    t
}

/// llama.cpp's rotary permutation of q/k rows (the inverse of what the loader undoes).
fn permute_rows(v: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..d / 2 {
                let src = h * d + j * (d / 2) + i;
                let dst = h * d + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Writes `weights` as a llama GGUF the way llama.cpp's converter does (q/k permuted), with
/// 2-D weights stored as `matrix_dtype` and 1-D ones as F32.
pub fn write_tiny_gguf(
    path: &Path,
    spec: &TinySpec,
    weights: &[(String, Vec<usize>, Vec<f32>)],
    matrix_dtype: GgmlDType,
) {
    tiny_gguf_writer(spec, weights, matrix_dtype)
        .write(path)
        .expect("write tiny gguf");
}

/// The writer behind `write_tiny_gguf`, for tests that add metadata before writing.
pub fn tiny_gguf_writer(
    spec: &TinySpec,
    weights: &[(String, Vec<usize>, Vec<f32>)],
    matrix_dtype: GgmlDType,
) -> GgufWriter {
    let mut w = GgufWriter::new();
    let u = |v: usize| GgufValue::U32(v as u32);
    w.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("llama.vocab_size", u(spec.vocab))
        .metadata("llama.context_length", u(256))
        .metadata("llama.embedding_length", u(spec.hidden))
        .metadata("llama.feed_forward_length", u(spec.intermediate))
        .metadata("llama.block_count", u(spec.layers))
        .metadata("llama.attention.head_count", u(spec.heads))
        .metadata("llama.attention.head_count_kv", u(spec.kv_heads))
        .metadata("llama.rope.freq_base", GgufValue::F32(10000.0))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        );
    for (name, shape, values) in weights {
        let (values, dims, dtype) = match shape.as_slice() {
            [n] => {
                let heads = if name.contains("q_proj") {
                    spec.heads
                } else {
                    spec.kv_heads
                };
                let v = if name.contains("q_proj.bias") || name.contains("k_proj.bias") {
                    permute_rows(values, *n, 1, heads)
                } else {
                    values.clone()
                };
                (v, vec![*n as u64], GgmlDType::F32)
            }
            [r, c] => {
                let v = if name.contains("q_proj") {
                    permute_rows(values, *r, *c, spec.heads)
                } else if name.contains("k_proj") {
                    permute_rows(values, *r, *c, spec.kv_heads)
                } else {
                    values.clone()
                };
                (v, vec![*c as u64, *r as u64], matrix_dtype)
            }
            _ => panic!("tiny weights are 1-D or 2-D"),
        };
        let bytes = crate::quant::quantize(dtype, &values).expect("quantize tiny weight");
        w.tensor(
            &crate::model::weights::hf_to_gguf_name(name),
            &dims,
            dtype.ggml_id(),
            bytes,
        );
    }
    w
}

/// Writes `weights` as a Hugging Face directory: `config.json` and `model.safetensors` (F32).
pub fn write_tiny_hf_dir(dir: &Path, spec: &TinySpec, weights: &[(String, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), spec.hf_config_json().to_string())
        .expect("write config");
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("tensor view");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors"))
        .expect("write safetensors");
}

/// Writes a tiny random model (seed 7) as `tiny.gguf` in `dir` and loads it.
pub fn load_tiny_gguf(dir: &Path, spec: &TinySpec, dtype: GgmlDType) -> crate::model::Llama {
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, spec, &tiny_weights(spec, 7), dtype);
    let file = crate::gguf::GgufFile::open(&path).expect("open tiny gguf");
    crate::model::Llama::from_gguf(&file, crate::model::LoadOptions::default())
        .expect("load tiny gguf")
}

/// A fixture's JSON array of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A fixture's JSON array of numbers.
pub fn json_floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Largest absolute element-wise difference of two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

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
            let (i, o) = crate::model::adapter::proj_dims(cfg, p);
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
