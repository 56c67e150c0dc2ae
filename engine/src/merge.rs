//! LoRA merged into a GGUF: the base file rewritten with `W + scale · B A` in place of every
//! projection the adapter touches, for runtimes that serve one adapter per model copy
//! (the mistralrs backend). Touched projections are stored as F32, so the merged model
//! computes what our forward computes with the adapter applied on the side: the base's
//! dequantized weights plus the exact delta. Requantizing to the base's format instead would
//! round away most of a small delta (a Q4_1 step is far larger than a typical LoRA update).
//! Every other tensor and all metadata are copied as they are.

use std::path::Path;

use crate::gguf::{GgufError, GgufFile, GgufWriter};
use crate::model::adapter::proj_dims;
use crate::model::weights::{hf_row_of_gguf_row, hf_to_gguf_name};
use crate::model::{AdapterWeights, Arch, LoraWeights, ModelConfig, Proj};
use crate::quant::{dequantize, GgmlDType, QuantError};

/// Why a merged file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The base file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A base tensor could not be dequantized.
    #[error("{tensor}: {source}")]
    Quant {
        /// GGUF tensor name.
        tensor: String,
        /// Why.
        source: QuantError,
    },
    /// The adapter and the file disagree (a missing tensor, another shape).
    #[error("{0}")]
    Mismatch(String),
    /// Prefix tuning has no merged form.
    #[error("a prefix adapter cannot be merged into the weights; only LoRA can")]
    Prefix,
    /// Writing the merged file failed.
    #[error("{path}: {source}")]
    Write {
        /// The merged file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What a merge wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeReport {
    /// Projections rewritten with their delta.
    pub merged_tensors: usize,
    /// Size of the merged file.
    pub bytes: u64,
}

/// The GGUF tensor name of layer `layer`'s projection `proj`.
pub fn gguf_proj_name(layer: usize, proj: Proj) -> String {
    let block = match proj {
        Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
        Proj::Gate | Proj::Up | Proj::Down => "mlp",
    };
    hf_to_gguf_name(&format!(
        "model.layers.{layer}.{block}.{}.weight",
        proj.module_name()
    ))
}

/// Writes `base` with `adapter`'s LoRA merged in to `out` (see the module docs). `cfg` is the
/// base's configuration. An adapter with a prefix is refused: it has no merged form.
pub fn merge_lora_into_gguf(
    base: &Path,
    cfg: &ModelConfig,
    adapter: &AdapterWeights,
    out: &Path,
) -> Result<MergeReport, MergeError> {
    if adapter.prefix().is_some() {
        return Err(MergeError::Prefix);
    }
    let file = GgufFile::open(base)?;
    let mut writer = GgufWriter::new();
    let mut keys: Vec<&String> = file.metadata.keys().collect();
    keys.sort();
    for key in keys {
        // The writer aligns tensor data to its own default; a copied alignment would lie.
        if key != "general.alignment" {
            writer.metadata(key, file.metadata[key].clone());
        }
    }
    let mut merged = 0;
    let lora: std::collections::HashMap<String, (Proj, &LoraWeights)> = adapter
        .lora()
        .map(|(&(layer, proj), w)| (gguf_proj_name(layer, proj), (proj, w)))
        .collect();
    for name in &file.tensor_order {
        let info = &file.tensors[name];
        let data = file.tensor_data(info);
        match lora.get(name) {
            None => {
                writer.tensor(name, &info.dims, info.type_id, data.to_vec());
            }
            Some(&(proj, w)) => {
                let (in_dim, out_dim) = proj_dims(cfg, proj);
                if info.dims != [in_dim as u64, out_dim as u64] {
                    return Err(MergeError::Mismatch(format!(
                        "{name}: the file has dims {:?}, the adapter expects [{in_dim}, {out_dim}]",
                        info.dims
                    )));
                }
                let dtype = GgmlDType::from_ggml_id(info.type_id).ok_or_else(|| {
                    MergeError::Mismatch(format!("{name}: unknown type id {}", info.type_id))
                })?;
                let mut weight = vec![0f32; in_dim * out_dim];
                dequantize(dtype, data, &mut weight).map_err(|source| MergeError::Quant {
                    tensor: name.clone(),
                    source,
                })?;
                // GGUF keeps Llama's q/k rows in llama.cpp's interleaved-rotary order; the
                // delta is in Hugging Face order.
                let heads = match (cfg.arch, proj) {
                    (Arch::Llama, Proj::Q) => Some(cfg.num_heads),
                    (Arch::Llama, Proj::K) => Some(cfg.num_kv_heads),
                    _ => None,
                };
                add_delta(&mut weight, w, heads);
                let bytes = weight.iter().flat_map(|v| v.to_le_bytes()).collect();
                writer.tensor(name, &info.dims, GgmlDType::F32.ggml_id(), bytes);
                merged += 1;
            }
        }
    }
    if merged != lora.len() {
        let missing: Vec<&String> = lora
            .keys()
            .filter(|k| !file.tensors.contains_key(*k))
            .collect();
        return Err(MergeError::Mismatch(format!(
            "the base file has no tensor for {missing:?}"
        )));
    }
    writer.write(out).map_err(|source| MergeError::Write {
        path: out.display().to_string(),
        source,
    })?;
    let bytes = std::fs::metadata(out)
        .map_err(|source| MergeError::Write {
            path: out.display().to_string(),
            source,
        })?
        .len();
    Ok(MergeReport {
        merged_tensors: merged,
        bytes,
    })
}

/// `weight[row] += scale · Σ_k B[hf_row, k] · A[k]`, where `weight` row `g` holds Hugging
/// Face row `hf_row(g)`: the identity, or for q/k with `heads` [`hf_row_of_gguf_row`].
fn add_delta(weight: &mut [f32], w: &LoraWeights, heads: Option<usize>) {
    let (rank, cols, rows) = (w.rank, w.in_dim, w.out_dim);
    let hf_row = |g: usize| heads.map_or(g, |heads| hf_row_of_gguf_row(g, rows, heads));
    for (g, row) in weight.chunks_exact_mut(cols).enumerate() {
        let b = &w.b[hf_row(g) * rank..][..rank];
        for (k, &bk) in b.iter().enumerate() {
            let coef = w.scale * bk;
            for (x, &a) in row.iter_mut().zip(&w.a[k * cols..][..cols]) {
                *x += coef * a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KvCache, Llama, LoadOptions, LogitsWanted, SeqStep};
    use crate::testing::{max_abs_diff, random_lora, tiny_weights, write_tiny_gguf, TinySpec};

    fn logits(model: &Llama, tokens: &[u32], adapter: Option<&AdapterWeights>) -> Vec<f32> {
        let mut cache = KvCache::new(model.config());
        let mut step = [SeqStep {
            tokens,
            cache: &mut cache,
            adapter: adapter.map(|a| a as &dyn crate::model::AdapterHook),
            logits: LogitsWanted::All,
        }];
        model.forward(&mut step).expect("forward").data
    }

    fn load(path: &Path) -> Llama {
        Llama::from_gguf(&GgufFile::open(path).expect("open"), LoadOptions::default())
            .expect("load")
    }

    /// The merged file, loaded without the adapter, gives the logits its base gives with the
    /// adapter applied on the side, for quantized and unquantized bases and grouped-query
    /// attention (q and k permuted differently). For a quantized base the reference is the
    /// base dequantized to F32 (a merge with the delta scaled to 0): our forward quantizes
    /// activations for quantized weights, which the F32 merged projections do not.
    #[test]
    fn merged_file_equals_base_plus_adapter() {
        for (spec, dtype) in [
            (TinySpec::default(), GgmlDType::F32),
            (TinySpec::default(), GgmlDType::Q8_0),
            (
                TinySpec {
                    kv_heads: 1,
                    ..TinySpec::default()
                },
                GgmlDType::Q4_1,
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let base_path = dir.path().join("base.gguf");
            write_tiny_gguf(&base_path, &spec, &tiny_weights(&spec, 7), dtype);
            let base = load(&base_path);
            let cfg = base.config().clone();
            let lora = |scale| {
                AdapterWeights::new(&cfg, random_lora(&cfg, 3, 4, &Proj::ALL, 0.3, scale), None)
                    .expect("lora")
            };
            let adapter = lora(1.5);
            let merged_path = dir.path().join("merged.gguf");
            let report =
                merge_lora_into_gguf(&base_path, &cfg, &adapter, &merged_path).expect("merge");
            assert_eq!(report.merged_tensors, cfg.num_layers * Proj::ALL.len());
            let dequantized_path = dir.path().join("dequantized.gguf");
            merge_lora_into_gguf(&base_path, &cfg, &lora(0.0), &dequantized_path).expect("merge");
            let reference = if dtype == GgmlDType::F32 {
                base
            } else {
                load(&dequantized_path)
            };
            let tokens: Vec<u32> = (0..12).map(|i| (i * 5 + 2) % 90).collect();
            let want = logits(&reference, &tokens, Some(&adapter));
            let got = logits(&load(&merged_path), &tokens, None);
            let plain = logits(&reference, &tokens, None);
            let diff = max_abs_diff(&want, &got);
            assert!(
                diff < 1e-3,
                "{dtype:?}: merged differs from base + adapter by {diff}"
            );
            assert!(
                max_abs_diff(&want, &plain) > 1e-2,
                "{dtype:?}: the adapter must matter for the check to mean anything"
            );
        }
    }

    #[test]
    fn a_prefix_or_a_mismatched_file_is_refused() {
        let spec = TinySpec::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let base_path = dir.path().join("base.gguf");
        write_tiny_gguf(&base_path, &spec, &tiny_weights(&spec, 7), GgmlDType::F32);
        let cfg = load(&base_path).config().clone();
        let prefix = crate::testing::random_prefix(&cfg, 1, 2, 1.0, 1.0);
        let with_prefix = AdapterWeights::new(
            &cfg,
            random_lora(&cfg, 3, 2, &[Proj::Q], 0.3, 1.0),
            Some(prefix),
        )
        .expect("adapter");
        let out = dir.path().join("out.gguf");
        assert!(matches!(
            merge_lora_into_gguf(&base_path, &cfg, &with_prefix, &out),
            Err(MergeError::Prefix)
        ));
        // An adapter for a wider model does not fit this file.
        let wider = ModelConfig {
            intermediate_size: cfg.intermediate_size * 2,
            ..cfg.clone()
        };
        let adapter = AdapterWeights::new(
            &wider,
            random_lora(&wider, 3, 2, &[Proj::Up], 0.3, 1.0),
            None,
        )
        .expect("adapter");
        let err = merge_lora_into_gguf(&base_path, &wider, &adapter, &out).unwrap_err();
        assert!(matches!(err, MergeError::Mismatch(_)), "{err}");
        assert!(!out.exists(), "nothing is written on a refusal");
    }
}
