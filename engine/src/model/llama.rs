//! Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5) for serving on CPU.
//!
//! Reference: Hugging Face `transformers/models/llama/modeling_llama.py`. One call runs a batch
//! of sequences of different lengths, each with its own KV cache and adapter: every sequence's
//! new tokens are stacked into one activation matrix so each projection is one matmul over the
//! whole batch (the weights are read once per step, not once per sequence), then attention runs
//! per sequence and head in parallel. Quantized weights stay quantized; activations are
//! quantized per row as ggml does (see `crate::quant`), and with int8 activations the steps
//! between the matmuls are llama.cpp's arithmetic too (see [`super::ggml`]), so the numbers are
//! llama.cpp's.

use std::ops::Range;
use std::path::Path;

use super::config::{ConfigError, ModelConfig};
use super::ggml::{self, Order};
use super::hooks::{AdapterHook, Proj, ProjRows};
use super::kv_cache::KvCache;
use super::simd;
use super::weights::{Fused, Linear, LoadOptions, ModelWeights, WeightsError};
use crate::gguf::{GgufError, GgufFile};
use crate::quant::{self, QuantError};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {source}")]
    Config { path: String, source: ConfigError },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {message}")]
    Files { path: String, message: String },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("sequence of {needed} positions exceeds the context length {context}")]
    ContextLength { needed: usize, context: usize },
    #[error("kernel: {0}")]
    Kernel(#[from] QuantError),
}

/// Which logits a sequence wants back from a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk that is not the last).
    None,
    /// Only after the last new token (generation).
    Last,
    /// After every new token (teacher-forced scoring).
    All,
}

/// One sequence's part of a batched step.
pub struct SeqStep<'a> {
    /// New tokens to run.
    pub tokens: &'a [u32],
    /// The sequence's cache; the new tokens' keys/values are appended to it.
    pub cache: &'a mut KvCache,
    /// Adapter applied to this sequence (`None` = base model).
    pub adapter: Option<&'a dyn AdapterHook>,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

/// Logits of a step: `rows × vocab`, with each sequence's rows listed in `rows_of`.
#[derive(Debug, Clone)]
pub struct Logits {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Vocabulary size (row width).
    pub vocab: usize,
    /// For each sequence of the step, its range of rows in `data`.
    pub rows_of: Vec<Range<usize>>,
}

impl Logits {
    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.vocab..(r + 1) * self.vocab]
    }

    /// The last row of sequence `i`, if it asked for any.
    pub fn last_of(&self, i: usize) -> Option<&[f32]> {
        let r = self.rows_of.get(i)?;
        (!r.is_empty()).then(|| self.row(r.end - 1))
    }
}

/// Cos/sin rotary tables, `positions × head_dim/2`.
struct Rope {
    inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    len: usize,
    /// With ggml's tables and rotation (see [`ggml`]): the rotary base, for positions past
    /// the table.
    ggml_base: Option<f32>,
}

impl Rope {
    fn new(cfg: &ModelConfig, freq_factors: Option<&[f32]>, ggml: bool) -> Self {
        let plain = freq_factors.is_none() && cfg.rope_scaling.is_none();
        if ggml && plain {
            let len = cfg.rope_table_len();
            let (cos, sin) = ggml::rope_tables(cfg.rope_theta, cfg.head_dim / 2, len);
            return Rope {
                inv_freq: cfg.inv_freqs(),
                cos,
                sin,
                len,
                ggml_base: Some(cfg.rope_theta),
            };
        }
        let mut inv_freq = cfg.inv_freqs();
        if let Some(f) = freq_factors {
            for (x, d) in inv_freq.iter_mut().zip(f) {
                *x /= d;
            }
        }
        let len = cfg.rope_table_len();
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in &inv_freq {
                // f64 angle: at large positions f32 products lose the low bits that matter.
                let a = p as f64 * f as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope {
            inv_freq,
            cos,
            sin,
            len,
            ggml_base: None,
        }
    }

    /// Rotates `x` (one head, `head_dim` wide) to `pos`, rotate-half convention.
    fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let (lo, hi) = x.split_at_mut(half);
        if let Some(base) = self.ggml_base {
            let far;
            let (c, s) = if pos < self.len {
                let r = pos * half..(pos + 1) * half;
                (&self.cos[r.clone()], &self.sin[r])
            } else {
                far = ggml::rope_angles(base, half, pos);
                (&far.0[..], &far.1[..])
            };
            for i in 0..half {
                (lo[i], hi[i]) = ggml::rotate(lo[i], hi[i], c[i], s[i]);
            }
            return;
        }
        if pos < self.len {
            let c = &self.cos[pos * half..(pos + 1) * half];
            let s = &self.sin[pos * half..(pos + 1) * half];
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[i] + a * s[i];
            }
        } else {
            for i in 0..half {
                let ang = pos as f64 * self.inv_freq[i] as f64;
                let (s, c) = (ang.sin() as f32, ang.cos() as f32);
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c - b * s;
                hi[i] = b * c + a * s;
            }
        }
    }
}

/// A loaded Llama-family model.
pub struct Llama {
    cfg: ModelConfig,
    weights: ModelWeights,
    rope: Rope,
    /// llama.cpp's arithmetic around the matmuls ([`ggml`]): with quantized weights and int8
    /// activations, the mode in which the matmuls themselves are llama.cpp's.
    ggml: bool,
}

impl Llama {
    /// Builds a model from a configuration and weights.
    pub fn new(cfg: ModelConfig, weights: ModelWeights) -> Self {
        let ggml = ggml::uses_ggml_arithmetic(&weights);
        let rope = Rope::new(&cfg, weights.rope_freq_factors.as_deref(), ggml);
        Llama {
            cfg,
            weights,
            rope,
            ggml,
        }
    }

    /// Loads a GGUF file.
    pub fn from_gguf(file: &GgufFile, opts: LoadOptions) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_gguf(file).map_err(|source| ModelError::Config {
            path: file.path().display().to_string(),
            source,
        })?;
        let weights = ModelWeights::from_gguf(file, &cfg, opts)?;
        Ok(Self::new(cfg, weights))
    }

    /// Loads a Hugging Face model directory (`config.json` + `*.safetensors`).
    pub fn from_hf_dir(dir: &Path, opts: LoadOptions) -> Result<Self, ModelError> {
        let files_err = |message: String| ModelError::Files {
            path: dir.display().to_string(),
            message,
        };
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| files_err(format!("config.json: {e}")))?;
        let cfg = ModelConfig::from_hf_json(&text).map_err(|source| ModelError::Config {
            path: cfg_path.display().to_string(),
            source,
        })?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| files_err(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(files_err("no *.safetensors files".into()));
        }
        let weights = ModelWeights::from_safetensors(&files, &cfg, opts)?;
        Ok(Self::new(cfg, weights))
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The model's weights.
    pub fn weights(&self) -> &ModelWeights {
        &self.weights
    }

    /// Runs one step for a batch of sequences and returns the logits they asked for.
    pub fn forward(&self, batch: &mut [SeqStep<'_>]) -> Result<Logits, ModelError> {
        let cfg = &self.cfg;
        let (h, q_dim, kv_dim) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let inter = cfg.intermediate_size;

        // Rows: every new token of every sequence, sequence by sequence.
        let mut row_ranges = Vec::with_capacity(batch.len());
        let mut row_pos = Vec::new();
        let mut t = 0usize;
        for step in batch.iter() {
            let start = step.cache.len();
            let needed = start + step.tokens.len();
            if needed > cfg.max_position_embeddings {
                return Err(ModelError::ContextLength {
                    needed,
                    context: cfg.max_position_embeddings,
                });
            }
            for (i, &tok) in step.tokens.iter().enumerate() {
                if tok as usize >= cfg.vocab_size {
                    return Err(ModelError::TokenOutOfRange {
                        token: tok,
                        vocab: cfg.vocab_size,
                    });
                }
                row_pos.push(start + i);
            }
            row_ranges.push(t..t + step.tokens.len());
            t += step.tokens.len();
        }

        let mut x = vec![0f32; t * h];
        let mut r = 0;
        for step in batch.iter() {
            for &tok in step.tokens {
                self.weights
                    .embed
                    .dequantize_row(tok as usize, &mut x[r * h..(r + 1) * h])?;
                r += 1;
            }
        }

        let mut normed = vec![0f32; t * h];
        let mut qkv = vec![0f32; t * qkv_dim];
        let mut attn = vec![0f32; t * q_dim];
        let mut proj = vec![0f32; t * h];
        let mut gate_up = vec![0f32; t * 2 * inter];
        let mut act = vec![0f32; t * inter];

        for (li, layer) in self.weights.layers.iter().enumerate() {
            self.rms_norm_rows(&x, &layer.attn_norm, &mut normed);
            run_fused(&layer.qkv, &normed, t, &mut qkv, &[q_dim, kv_dim, kv_dim])?;
            add_deltas(
                self.ggml,
                batch,
                &row_ranges,
                li,
                &[Proj::Q, Proj::K, Proj::V],
                &normed,
                h,
                &mut qkv,
                &[q_dim, kv_dim, kv_dim],
            );

            // Rotary on q and k, then append k and v to each sequence's cache.
            let hd = cfg.head_dim;
            for (row, &pos) in qkv.chunks_exact_mut(qkv_dim).zip(&row_pos) {
                let (q, rest) = row.split_at_mut(q_dim);
                for head in q.chunks_exact_mut(hd) {
                    self.rope.apply(head, pos);
                }
                for head in rest[..kv_dim].chunks_exact_mut(hd) {
                    self.rope.apply(head, pos);
                }
            }
            if self.ggml {
                // llama.cpp's KV cache and attention matmuls are f16.
                ggml::f16_round_all(&mut qkv);
            }
            for (step, rows) in batch.iter_mut().zip(&row_ranges) {
                for r in rows.clone() {
                    let row = &qkv[r * qkv_dim..(r + 1) * qkv_dim];
                    step.cache
                        .append(li, &row[q_dim..q_dim + kv_dim], &row[q_dim + kv_dim..]);
                }
            }

            self.attention(batch, &row_ranges, &row_pos, li, &qkv, &mut attn);

            linear(&layer.o, &attn, t, &mut proj)?;
            add_deltas(
                self.ggml,
                batch,
                &row_ranges,
                li,
                &[Proj::O],
                &attn,
                q_dim,
                &mut proj,
                &[h],
            );
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }

            self.rms_norm_rows(&x, &layer.ffn_norm, &mut normed);
            run_fused(&layer.gate_up, &normed, t, &mut gate_up, &[inter, inter])?;
            add_deltas(
                self.ggml,
                batch,
                &row_ranges,
                li,
                &[Proj::Gate, Proj::Up],
                &normed,
                h,
                &mut gate_up,
                &[inter, inter],
            );
            for (gu, out) in gate_up
                .chunks_exact(2 * inter)
                .zip(act.chunks_exact_mut(inter))
            {
                let (g, u) = gu.split_at(inter);
                if self.ggml {
                    ggml::swiglu(g, u, out);
                } else {
                    for i in 0..inter {
                        out[i] = silu(g[i]) * u[i];
                    }
                }
            }
            linear(&layer.down, &act, t, &mut proj)?;
            add_deltas(
                self.ggml,
                batch,
                &row_ranges,
                li,
                &[Proj::Down],
                &act,
                inter,
                &mut proj,
                &[h],
            );
            for (a, b) in x.iter_mut().zip(&proj) {
                *a += b;
            }
        }
        for (step, rows) in batch.iter_mut().zip(&row_ranges) {
            step.cache.advance(rows.len());
        }

        // Final norm and head only on the rows someone wants.
        let mut wanted = Vec::new();
        let mut rows_of = Vec::with_capacity(batch.len());
        for (step, rows) in batch.iter().zip(&row_ranges) {
            let begin = wanted.len();
            match step.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last => {
                    wanted.extend(rows.end.checked_sub(1).filter(|_| !rows.is_empty()))
                }
                LogitsWanted::All => wanted.extend(rows.clone()),
            }
            rows_of.push(begin..wanted.len());
        }
        let mut sel = vec![0f32; wanted.len() * h];
        for (dst, &r) in sel.chunks_exact_mut(h).zip(&wanted) {
            dst.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut sel_normed = vec![0f32; sel.len()];
        self.rms_norm_rows(&sel, &self.weights.norm, &mut sel_normed);
        let vocab = cfg.vocab_size;
        let mut data = vec![0f32; wanted.len() * vocab];
        if !wanted.is_empty() {
            self.weights
                .lm_head
                .matmul(&sel_normed, wanted.len(), &mut data)?;
        }
        Ok(Logits {
            data,
            vocab,
            rows_of,
        })
    }

    /// Causal attention of every new row against its sequence's cache, in parallel over
    /// (row, head).
    fn attention(
        &self,
        batch: &[SeqStep<'_>],
        row_ranges: &[Range<usize>],
        row_pos: &[usize],
        layer: usize,
        qkv: &[f32],
        out: &mut [f32],
    ) {
        let cfg = &self.cfg;
        let (hd, nh, q_dim, kv_dim) = (cfg.head_dim, cfg.num_heads, cfg.q_dim(), cfg.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let group = nh / cfg.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let t = row_pos.len();
        let mut row_seq = vec![0usize; t];
        for (i, rows) in row_ranges.iter().enumerate() {
            row_seq[rows.clone()].fill(i);
        }
        let caches: Vec<(&[f32], &[f32])> = batch.iter().map(|s| s.cache.layer(layer)).collect();
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let k = simd::kernels();
        let task = |task: usize| {
            let (row, head) = (task / nh, task % nh);
            let (keys, values) = caches[row_seq[row]];
            // A row's position is its index in the cache (a prefix adapter's virtual tokens
            // come first, as in PEFT), and it sees everything up to and including itself.
            let seen = (row_pos[row] + 1).min(keys.len() / kv_dim);
            let q = &qkv[row * qkv_dim + head * hd..][..hd];
            let kvh = head / group;
            // SAFETY: each task writes only its own (row, head) slice of `out`, which is
            // disjoint from every other task's, and `out` outlives the parallel region.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(row * q_dim + head * hd), hd)
            };
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                scores.clear();
                scores.resize(seen, 0.0);
                if self.ggml {
                    let order = Order::for_step(row_ranges[row_seq[row]].len());
                    let (keys, values) = (&keys[kvh * hd..], &values[kvh * hd..]);
                    ggml::dot_rows(&mut scores, q, keys, kv_dim, order);
                    for s in scores.iter_mut() {
                        *s *= scale;
                    }
                    ggml::soft_max_f16(&mut scores);
                    ggml::weighted_rows(dst, &scores, values, kv_dim, order);
                    return;
                }
                // This head's keys and values are rows `kv_dim` apart from column `kvh · hd`.
                (k.dot_rows)(&mut scores, q, &keys[kvh * hd..], kv_dim);
                for s in scores.iter_mut() {
                    *s *= scale;
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let inv = 1.0 / (k.exp_sum)(&mut scores, max);
                for s in scores.iter_mut() {
                    *s *= inv;
                }
                dst.fill(0.0);
                (k.gemv_t)(dst, &scores, &values[kvh * hd..], kv_dim);
            });
        };
        quant::parallel_for(t * nh, &task);
    }
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A raw pointer that may cross threads; the user guarantees disjoint writes.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: only used for disjoint writes inside a scoped parallel region (see `attention`).
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Llama {
    /// RMSNorm of each row of `x` into `out`, in ggml's arithmetic when the model uses it.
    fn rms_norm_rows(&self, x: &[f32], w: &[f32], out: &mut [f32]) {
        if self.ggml {
            ggml::rms_norm_rows(x, w, self.cfg.rms_norm_eps, out);
        } else {
            rms_norm_rows(x, w, self.cfg.rms_norm_eps, out);
        }
    }
}

/// RMSNorm of each row of `x` (width `w.len()`) into `out`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for i in 0..n {
            dst[i] = row[i] * inv * w[i];
        }
    }
}

fn linear(l: &Linear, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), QuantError> {
    l.weight.matmul(x, m, out)?;
    if let Some(b) = &l.bias {
        for row in out.chunks_exact_mut(b.len()) {
            for (o, bb) in row.iter_mut().zip(b) {
                *o += bb;
            }
        }
    }
    Ok(())
}

/// Runs fused projections into `out` (`m × Σwidths`), whether stored fused or split.
fn run_fused(
    f: &Fused,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    widths: &[usize],
) -> Result<(), QuantError> {
    match f {
        Fused::One(l) => linear(l, x, m, out),
        Fused::Split(parts) => {
            let total: usize = widths.iter().sum();
            let mut offset = 0;
            for (l, &w) in parts.iter().zip(widths) {
                let mut tmp = vec![0f32; m * w];
                linear(l, x, m, &mut tmp)?;
                for (dst, src) in out.chunks_exact_mut(total).zip(tmp.chunks_exact(w)) {
                    dst[offset..offset + w].copy_from_slice(src);
                }
                offset += w;
            }
            Ok(())
        }
    }
}

/// Lets each sequence's adapter add its delta to its own rows of a (possibly fused) output.
/// Rows whose adapters share weights (one adapter, or leases of one version) run together, so
/// a step reads each adapter's weights once per task rather than once per row; the tasks run
/// in parallel on the compute pool, each owning a disjoint set of rows. `int8`: the model runs
/// llama.cpp's 8-bit arithmetic, and adapters apply 8-bit LoRA weights (see [`ProjRows`]).
#[allow(clippy::too_many_arguments)]
fn add_deltas(
    int8: bool,
    batch: &[SeqStep<'_>],
    row_ranges: &[Range<usize>],
    layer: usize,
    projs: &[Proj],
    x: &[f32],
    in_dim: usize,
    out: &mut [f32],
    widths: &[usize],
) {
    /// Rows per task: small enough to spread a prefill chunk over the threads.
    const ROWS_PER_TASK: usize = 8;
    let stride: usize = widths.iter().sum();
    // Rows grouped by the weights behind their adapter, groups in order of first appearance.
    // Without a key a hook groups only with itself: the same object (address and vtable; a
    // duplicated vtable only keeps two groups apart, which is safe).
    let same = |a: &dyn AdapterHook, b: &dyn AdapterHook| match (a.weights_key(), b.weights_key()) {
        (Some(x), Some(y)) => x == y,
        _ => std::ptr::eq(a, b),
    };
    let mut groups: Vec<(&dyn AdapterHook, Vec<usize>)> = Vec::new();
    for (step, rows) in batch.iter().zip(row_ranges) {
        let Some(adapter) = step.adapter else {
            continue;
        };
        match groups.iter_mut().find(|(a, _)| same(*a, adapter)) {
            Some((_, g)) => g.extend(rows.clone()),
            None => groups.push((adapter, rows.clone().collect())),
        }
    }
    let tasks: Vec<(&dyn AdapterHook, &[usize])> = groups
        .iter()
        .flat_map(|(a, rows)| rows.chunks(ROWS_PER_TASK).map(move |c| (*a, c)))
        .collect();
    if tasks.is_empty() {
        return;
    }
    let rows_total = row_ranges.last().map_or(0, |r| r.end);
    assert!(out.len() >= rows_total * stride && x.len() >= rows_total * in_dim);
    struct OutPtr(*mut f32);
    // SAFETY: tasks write through the pointer only to their own disjoint rows.
    unsafe impl Sync for OutPtr {}
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |i: usize| {
        let (adapter, rows) = tasks[i];
        // The whole wrapper, not its raw-pointer field, is what the closure may share.
        let out_base = &out_ptr;
        let contiguous = rows.windows(2).all(|w| w[1] == w[0] + 1);
        let apply = |x: &[f32], out: &mut [f32]| {
            let mut offset = 0;
            for (&proj, &w) in projs.iter().zip(widths) {
                adapter.add_delta(ProjRows {
                    layer,
                    proj,
                    x,
                    in_dim,
                    out: &mut *out,
                    out_stride: stride,
                    out_offset: offset,
                    out_dim: w,
                    rows: rows.len(),
                    int8,
                });
                offset += w;
            }
        };
        if contiguous {
            let first = rows[0];
            // SAFETY: the rows lie inside `out` (asserted above) and no two tasks share a
            // row, so this is the only live reference to these elements while the task runs.
            let out_rows = unsafe {
                std::slice::from_raw_parts_mut(out_base.0.add(first * stride), rows.len() * stride)
            };
            apply(&x[first * in_dim..(first + rows.len()) * in_dim], out_rows);
        } else {
            // Rows of several sequences: gather them, add, and write them back.
            let mut xs = Vec::with_capacity(rows.len() * in_dim);
            let mut outs = Vec::with_capacity(rows.len() * stride);
            for &r in rows {
                xs.extend_from_slice(&x[r * in_dim..(r + 1) * in_dim]);
                // SAFETY: as above, row `r` belongs to this task alone.
                outs.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(out_base.0.add(r * stride), stride)
                });
            }
            apply(&xs, &mut outs);
            for (&r, row) in rows.iter().zip(outs.chunks_exact(stride)) {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts_mut(out_base.0.add(r * stride), stride) }
                    .copy_from_slice(row);
            }
        }
    };
    quant::parallel_for(tasks.len(), &run);
}
