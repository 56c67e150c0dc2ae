//! Base weights of a Llama-family model, loaded from GGUF or Hugging Face safetensors into one
//! layout: Hugging Face row order (GGUF's rotary permutation of q/k is undone at load, so PEFT
//! adapters trained on Hugging Face weights apply unchanged), q/k/v and gate/up fused into one
//! matrix each when they share a storage type, quantized blocks kept as they are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::{Arch, ModelConfig};
use crate::gguf::{GgufFile, GgufTensorInfo};
use crate::quant::{Activations, GgmlDType, QMatrix, QuantError, WeightBytes};

/// Why weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{file}: missing tensor `{name}`")]
    Missing { file: PathBuf, name: String },
    #[error("{file}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{file}: tensor `{name}` has unsupported type {dtype}")]
    Type {
        file: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{file}: tensor `{name}`: {source}")]
    Quant {
        file: PathBuf,
        name: String,
        source: QuantError,
    },
    #[error("{file}: {message}")]
    Safetensors { file: PathBuf, message: String },
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// A linear layer `y = x Wᵀ (+ b)`.
#[derive(Clone)]
pub struct Linear {
    /// `out_features × in_features`.
    pub weight: QMatrix,
    /// Optional bias of length `out_features`.
    pub bias: Option<Vec<f32>>,
}

/// Projections that may be stored as one fused matrix.
#[derive(Clone)]
pub enum Fused {
    /// One matrix whose output rows are the parts, concatenated in order.
    One(Linear),
    /// Separate matrices (storage types differ).
    Split(Vec<Linear>),
}

/// Weights of one decoder layer.
#[derive(Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// q, k, v projections.
    pub qkv: Fused,
    /// Attention output projection.
    pub o: Linear,
    /// RMSNorm before the MLP.
    pub ffn_norm: Vec<f32>,
    /// gate and up projections.
    pub gate_up: Fused,
    /// down projection.
    pub down: Linear,
}

/// All base weights.
#[derive(Clone)]
pub struct ModelWeights {
    /// Token embedding, `vocab × hidden`.
    pub embed: QMatrix,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm.
    pub norm: Vec<f32>,
    /// Output head, `vocab × hidden` (the embedding when tied).
    pub lm_head: QMatrix,
    /// Per-frequency divisors for rotary (GGUF `rope_freqs.weight`, Llama 3), if any.
    pub rope_freq_factors: Option<Vec<f32>>,
}

/// How to load weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Dequantise every matrix to f32 (exact reference arithmetic; the training path needs it).
    pub dequantize: bool,
    /// What quantized matrices do with their activations (ignored with `dequantize`).
    pub activations: Activations,
}

/// A named 2-D source tensor: storage type, rows, cols and bytes.
struct RawTensor {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    bytes: WeightBytes,
}

/// Where tensors come from, addressed by Hugging Face-style logical names.
trait TensorSource {
    fn file(&self) -> &Path;
    fn get(&self, name: &str) -> Option<Result<RawTensor, WeightsError>>;
    /// The source name of a logical tensor, for error messages.
    fn source_name(&self, name: &str) -> String;
    /// Whether q/k rows are stored in llama.cpp's interleaved-rotary order.
    fn permutes_qk(&self) -> bool {
        false
    }
}

impl ModelWeights {
    /// Loads weights from a parsed GGUF file.
    pub fn from_gguf(
        file: &GgufFile,
        cfg: &ModelConfig,
        opts: LoadOptions,
    ) -> Result<Self, WeightsError> {
        let src = GgufSource { file };
        let mut w = Self::load(&src, cfg, opts)?;
        if let Some(t) = src.get("rope_freqs") {
            let t = t?;
            let mut v = vec![0f32; t.rows * t.cols];
            to_f32(&src, "rope_freqs", &t, &mut v)?;
            w.rope_freq_factors = Some(v);
        }
        Ok(w)
    }

    /// Loads weights from one or more `*.safetensors` files of a Hugging Face directory.
    pub fn from_safetensors(
        files: &[PathBuf],
        cfg: &ModelConfig,
        opts: LoadOptions,
    ) -> Result<Self, WeightsError> {
        let src = SafetensorsSource::open(files)?;
        Self::load(&src, cfg, opts)
    }

    /// Bytes of all weights (mapped or owned).
    pub fn size_in_bytes(&self) -> usize {
        let fused = |f: &Fused| match f {
            Fused::One(l) => l.weight.size_in_bytes(),
            Fused::Split(ls) => ls.iter().map(|l| l.weight.size_in_bytes()).sum(),
        };
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                fused(&l.qkv)
                    + fused(&l.gate_up)
                    + l.o.weight.size_in_bytes()
                    + l.down.weight.size_in_bytes()
            })
            .sum();
        layers + self.embed.size_in_bytes() + self.lm_head.size_in_bytes()
    }

    fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        opts: LoadOptions,
    ) -> Result<Self, WeightsError> {
        let h = cfg.hidden_size;
        let embed = matrix(src, "model.embed_tokens", cfg.vocab_size, h, opts, None)?;
        let lm_head = if cfg.tie_word_embeddings || src.get("lm_head.weight").is_none() {
            embed.clone()
        } else {
            matrix(src, "lm_head", cfg.vocab_size, h, opts, None)?
        };
        let norm = vector(src, "model.norm", h)?;
        // GGUF stores Llama q/k rows permuted for interleaved rotary; undo it so the forward
        // and adapters see Hugging Face order.
        let permuted = src.permutes_qk() && cfg.arch == Arch::Llama;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let q_perm = permuted.then_some(cfg.num_heads);
            let k_perm = permuted.then_some(cfg.num_kv_heads);
            let q = linear(src, &p("self_attn.q_proj"), cfg.q_dim(), h, opts, q_perm)?;
            let k = linear(src, &p("self_attn.k_proj"), cfg.kv_dim(), h, opts, k_perm)?;
            let v = linear(src, &p("self_attn.v_proj"), cfg.kv_dim(), h, opts, None)?;
            let o = linear(src, &p("self_attn.o_proj"), h, cfg.q_dim(), opts, None)?;
            let gate = linear(
                src,
                &p("mlp.gate_proj"),
                cfg.intermediate_size,
                h,
                opts,
                None,
            )?;
            let up = linear(src, &p("mlp.up_proj"), cfg.intermediate_size, h, opts, None)?;
            let down = linear(
                src,
                &p("mlp.down_proj"),
                h,
                cfg.intermediate_size,
                opts,
                None,
            )?;
            layers.push(LayerWeights {
                attn_norm: vector(src, &p("input_layernorm"), h)?,
                qkv: fuse(src, &p("self_attn.qkv"), vec![q, k, v])?,
                o,
                ffn_norm: vector(src, &p("post_attention_layernorm"), h)?,
                gate_up: fuse(src, &p("mlp.gate_up"), vec![gate, up])?,
                down,
            });
        }
        Ok(ModelWeights {
            embed,
            layers,
            norm,
            lm_head,
            rope_freq_factors: None,
        })
    }
}

fn fetch(src: &dyn TensorSource, name: &str) -> Result<RawTensor, WeightsError> {
    src.get(name).unwrap_or_else(|| {
        Err(WeightsError::Missing {
            file: src.file().to_path_buf(),
            name: src.source_name(name),
        })
    })
}

fn check_shape(
    src: &dyn TensorSource,
    name: &str,
    t: &RawTensor,
    rows: usize,
    cols: usize,
) -> Result<(), WeightsError> {
    if t.rows != rows || t.cols != cols {
        return Err(WeightsError::Shape {
            file: src.file().to_path_buf(),
            name: src.source_name(name),
            expected: vec![rows, cols],
            actual: vec![t.rows, t.cols],
        });
    }
    Ok(())
}

fn quant_err(src: &dyn TensorSource, name: &str) -> impl Fn(QuantError) -> WeightsError {
    let file = src.file().to_path_buf();
    let name = src.source_name(name);
    move |source| WeightsError::Quant {
        file: file.clone(),
        name: name.clone(),
        source,
    }
}

fn to_f32(
    src: &dyn TensorSource,
    name: &str,
    t: &RawTensor,
    out: &mut [f32],
) -> Result<(), WeightsError> {
    crate::quant::dequantize(t.dtype, &t.bytes, out).map_err(quant_err(src, name))
}

/// A 1-D tensor (norm weight or bias) as f32.
fn vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>, WeightsError> {
    let t = fetch(src, &format!("{name}.weight"))?;
    check_shape(src, &format!("{name}.weight"), &t, 1, len)?;
    let mut v = vec![0f32; len];
    to_f32(src, name, &t, &mut v)?;
    Ok(v)
}

/// The Hugging Face row of GGUF row `g` of a q/k projection with `rows` rows over `heads`
/// heads: GGUF stores Llama's q/k rows in llama.cpp's interleaved-rotary order, Hugging Face
/// row `h·d + j·d/2 + i` as GGUF row `h·d + 2i + j`.
pub fn hf_row_of_gguf_row(g: usize, rows: usize, heads: usize) -> usize {
    let d = rows / heads;
    let (h, r) = (g / d, g % d);
    h * d + (r % 2) * (d / 2) + r / 2
}

/// Row permutation that undoes GGUF's rotary reordering ([`hf_row_of_gguf_row`]).
fn unpermute_rows(bytes: &[u8], row_bytes: usize, heads: usize, rows: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes.len()];
    for g in 0..rows {
        let hf = hf_row_of_gguf_row(g, rows, heads);
        out[hf * row_bytes..(hf + 1) * row_bytes]
            .copy_from_slice(&bytes[g * row_bytes..(g + 1) * row_bytes]);
    }
    out
}

fn matrix(
    src: &dyn TensorSource,
    name: &str,
    rows: usize,
    cols: usize,
    opts: LoadOptions,
    unpermute_heads: Option<usize>,
) -> Result<QMatrix, WeightsError> {
    let wname = format!("{name}.weight");
    let t = fetch(src, &wname)?;
    check_shape(src, &wname, &t, rows, cols)?;
    let qerr = quant_err(src, &wname);
    let row_bytes = t.dtype.row_bytes(cols).ok_or_else(|| WeightsError::Type {
        file: src.file().to_path_buf(),
        name: src.source_name(&wname),
        dtype: format!(
            "{} with {cols} columns (not a whole number of blocks)",
            t.dtype.name()
        ),
    })?;
    let bytes = match unpermute_heads {
        Some(heads) if heads > 0 && rows.is_multiple_of(2 * heads) => {
            WeightBytes::Owned(Arc::from(unpermute_rows(&t.bytes, row_bytes, heads, rows)))
        }
        _ => t.bytes,
    };
    let m = QMatrix::new(t.dtype, rows, cols, bytes)
        .map_err(&qerr)?
        .with_activations(opts.activations);
    if opts.dequantize && m.dtype() != GgmlDType::F32 {
        QMatrix::from_f32(GgmlDType::F32, rows, cols, &m.to_f32()).map_err(&qerr)
    } else {
        Ok(m)
    }
}

fn linear(
    src: &dyn TensorSource,
    name: &str,
    rows: usize,
    cols: usize,
    opts: LoadOptions,
    unpermute_heads: Option<usize>,
) -> Result<Linear, WeightsError> {
    let weight = matrix(src, name, rows, cols, opts, unpermute_heads)?;
    let bias_name = format!("{name}.bias");
    let bias = match src.get(&bias_name) {
        None => None,
        Some(t) => {
            let t = t?;
            check_shape(src, &bias_name, &t, 1, rows)?;
            let mut b = vec![0f32; rows];
            to_f32(src, &bias_name, &t, &mut b)?;
            if let Some(heads) = unpermute_heads {
                let bytes: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
                let un = unpermute_rows(&bytes, 4, heads, rows);
                b = un
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
            }
            Some(b)
        }
    };
    Ok(Linear { weight, bias })
}

/// Concatenates the rows of `parts` into one matrix when they share a storage type, so the
/// forward runs one matmul (one pass over the activations, one thread-pool dispatch) for them.
fn fuse(src: &dyn TensorSource, name: &str, parts: Vec<Linear>) -> Result<Fused, WeightsError> {
    let dtype = parts[0].weight.dtype();
    let cols = parts[0].weight.cols();
    if !parts
        .iter()
        .all(|p| p.weight.dtype() == dtype && p.weight.cols() == cols)
    {
        return Ok(Fused::Split(parts));
    }
    let rows: usize = parts.iter().map(|p| p.weight.rows()).sum();
    let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.weight.size_in_bytes()).sum());
    for p in &parts {
        for r in 0..p.weight.rows() {
            bytes.extend_from_slice(p.weight.row_bytes_slice(r));
        }
    }
    let bias = if parts.iter().any(|p| p.bias.is_some()) {
        let mut b = Vec::with_capacity(rows);
        for p in &parts {
            match &p.bias {
                Some(pb) => b.extend_from_slice(pb),
                None => b.extend(std::iter::repeat_n(0.0, p.weight.rows())),
            }
        }
        Some(b)
    } else {
        None
    };
    let weight = QMatrix::new(dtype, rows, cols, WeightBytes::Owned(Arc::from(bytes)))
        .map_err(quant_err(src, name))?
        .with_activations(parts[0].weight.activations());
    Ok(Fused::One(Linear { weight, bias }))
}

/// GGUF tensors under their Hugging Face names.
struct GgufSource<'a> {
    file: &'a GgufFile,
}

/// The GGUF tensor name of a Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`
/// → `blk.3.attn_q.weight`).
pub fn hf_to_gguf_name(name: &str) -> String {
    GgufSource::gguf_name(name)
}

impl GgufSource<'_> {
    fn gguf_name(name: &str) -> String {
        let (stem, suffix) = match name.rsplit_once('.') {
            Some((s, x @ ("weight" | "bias"))) => (s, x),
            _ => (name, "weight"),
        };
        let mapped = match stem {
            "model.embed_tokens" => "token_embd".to_string(),
            "model.norm" => "output_norm".to_string(),
            "lm_head" => "output".to_string(),
            "rope_freqs" => "rope_freqs".to_string(),
            _ => {
                let Some(rest) = stem.strip_prefix("model.layers.") else {
                    return name.to_string();
                };
                let Some((idx, part)) = rest.split_once('.') else {
                    return name.to_string();
                };
                let part = match part {
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    other => other,
                };
                format!("blk.{idx}.{part}")
            }
        };
        format!("{mapped}.{suffix}")
    }

    fn raw(&self, info: &GgufTensorInfo) -> Result<RawTensor, WeightsError> {
        let dtype = GgmlDType::from_ggml_id(info.type_id).ok_or_else(|| WeightsError::Type {
            file: self.file.path().to_path_buf(),
            name: info.name.clone(),
            dtype: format!("ggml type {}", info.type_id),
        })?;
        let (rows, cols) = match info.dims.as_slice() {
            [c] => (1, *c as usize),
            [c, r] => (*r as usize, *c as usize),
            other => {
                return Err(WeightsError::Shape {
                    file: self.file.path().to_path_buf(),
                    name: info.name.clone(),
                    expected: vec![],
                    actual: other.iter().map(|&d| d as usize).collect(),
                })
            }
        };
        let bytes = WeightBytes::Mapped {
            map: self.file.mapping().clone(),
            offset: info.offset,
            len: info.len,
        };
        Ok(RawTensor {
            dtype,
            rows,
            cols,
            bytes,
        })
    }
}

impl TensorSource for GgufSource<'_> {
    fn file(&self) -> &Path {
        self.file.path()
    }

    fn get(&self, name: &str) -> Option<Result<RawTensor, WeightsError>> {
        let info = self.file.tensors.get(&Self::gguf_name(name))?;
        Some(self.raw(info))
    }

    fn source_name(&self, name: &str) -> String {
        Self::gguf_name(name)
    }

    fn permutes_qk(&self) -> bool {
        true
    }
}

/// Tensors of one or more memory-mapped safetensors files.
struct SafetensorsSource {
    first: PathBuf,
    maps: Vec<(PathBuf, Arc<memmap2::Mmap>)>,
    /// name → (file index, dtype, shape, byte offset in the mapping, byte length)
    index: HashMap<String, (usize, GgmlDType, Vec<usize>, usize, usize)>,
}

impl SafetensorsSource {
    fn open(files: &[PathBuf]) -> Result<Self, WeightsError> {
        let first = files.first().cloned().unwrap_or_default();
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (fi, path) in files.iter().enumerate() {
            let io = |source| WeightsError::Io {
                file: path.clone(),
                source,
            };
            let f = std::fs::File::open(path).map_err(io)?;
            // SAFETY: read-only private mapping of a weights file treated as immutable.
            let map = Arc::new(unsafe { memmap2::Mmap::map(&f) }.map_err(io)?);
            let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
                WeightsError::Safetensors {
                    file: path.clone(),
                    message: e.to_string(),
                }
            })?;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => GgmlDType::F32,
                    safetensors::Dtype::F16 => GgmlDType::F16,
                    safetensors::Dtype::BF16 => GgmlDType::BF16,
                    other => {
                        return Err(WeightsError::Type {
                            file: path.clone(),
                            name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
                index.insert(
                    name,
                    (fi, dtype, view.shape().to_vec(), offset, view.data().len()),
                );
            }
            maps.push((path.clone(), map));
        }
        Ok(SafetensorsSource { first, maps, index })
    }
}

impl TensorSource for SafetensorsSource {
    fn file(&self) -> &Path {
        &self.first
    }

    fn get(&self, name: &str) -> Option<Result<RawTensor, WeightsError>> {
        let (fi, dtype, shape, offset, len) = self.index.get(name)?;
        let (path, map) = &self.maps[*fi];
        let (rows, cols) = match shape.as_slice() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            other => {
                return Some(Err(WeightsError::Shape {
                    file: path.clone(),
                    name: name.to_string(),
                    expected: vec![],
                    actual: other.to_vec(),
                }))
            }
        };
        let bytes = WeightBytes::Mapped {
            map: map.clone(),
            offset: *offset,
            len: *len,
        };
        Some(Ok(RawTensor {
            dtype: *dtype,
            rows,
            cols,
            bytes,
        }))
    }

    fn source_name(&self, name: &str) -> String {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_gguf_rotary_permutation() {
        // Reference permutation from llama.cpp's convert script: reshape(heads, 2, d/2, ..)
        // then swap axes 1 and 2.
        let (heads, d) = (3, 8);
        let rows = heads * d;
        let hf: Vec<u8> = (0..rows as u8).collect();
        let mut gguf = vec![0u8; rows];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    gguf[h * d + i * 2 + j] = hf[h * d + j * (d / 2) + i];
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, 1, heads, rows), hf);
    }

    #[test]
    fn maps_hf_names_to_gguf_names() {
        assert_eq!(
            GgufSource::gguf_name("model.layers.3.self_attn.q_proj.weight"),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            GgufSource::gguf_name("model.layers.0.self_attn.k_proj.bias"),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            GgufSource::gguf_name("model.embed_tokens.weight"),
            "token_embd.weight"
        );
        assert_eq!(GgufSource::gguf_name("lm_head.weight"), "output.weight");
        assert_eq!(GgufSource::gguf_name("rope_freqs"), "rope_freqs.weight");
    }
}
