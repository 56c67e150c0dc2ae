//! [`QMatrix`]: a weight matrix in ggml blocks and its ggml-exact matmul.
//!
//! `out[m, rows] = x[m, cols] · Wᵀ`. As in ggml, quantized weights see activations first
//! quantized per row to the weight's vec-dot type (Q8_0, Q8_1 or Q8_K) and then integer block
//! dots ([`Activations::Int8`], the default). With [`Activations::F32`] the activations stay f32
//! and the weights are dequantized a tile of rows at a time (weight-only quantization).
//! Float weights (F32/F16/BF16) take the f32 activations unchanged (ggml would round
//! activations to f16 for F16 weights; keeping f32 is slightly more accurate and simpler).

use super::kernels::{activation_scales, kernels, TILE_BLOCK_BYTES};
use super::pool::{num_threads, parallel_for};
use super::quantize::quantize_into;
use super::{dequantize, quantize, GgmlDType, QuantError, WeightBytes};
use std::cell::RefCell;

/// What a quantized matrix's product does with its f32 activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// Quantized per row to 8-bit blocks of the weight's vec-dot type and multiplied in
    /// integer block dots, as ggml does: llama.cpp's arithmetic and the fast path. The
    /// rounding moves a log-prob by ~0.05 against the f32 product.
    #[default]
    Int8,
    /// Kept in f32; each weight row is dequantized (a tile of rows at a time, never the whole
    /// matrix) and multiplied in f32, so the product is the dequantized matrix's up to
    /// summation order: weight-only quantization, as AWQ/GPTQ W4A16 serving does. The weights
    /// stay quantized in memory; the arithmetic costs more than `Int8`.
    F32,
}

/// A weight matrix `[rows = out_features, cols = in_features]`, row-major in ggml blocks.
#[derive(Clone, Debug)]
pub struct QMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: WeightBytes,
    activations: Activations,
}

thread_local! {
    /// Per-thread buffer for quantized activations, so matmul does not allocate per call.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Per-thread tile of dequantized weight rows for [`Activations::F32`].
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread packed four-row weight tile for the register-blocked kernels.
    static PACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether the faster but batch-dependent multi-row kernels are enabled (see `matmul_prepared`).
fn fast_batch() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| std::env::var_os("PREFIX_RFT_QUANT_FAST_BATCH").is_some())
}

/// Runs `f` on a scratch buffer of `len` bytes (the thread's cached one when free).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    with_buffer(&SCRATCH, len, f)
}

/// Runs `f` on the first `len` elements of the thread's buffer in `key`, grown as needed and
/// kept for the next call; a fresh one when re-entered (a matmul inside a matmul task on this
/// thread).
pub(crate) fn with_buffer<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

/// The output pointer shared by the row tasks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint sets of output elements (their own rows), and the pointer
// outlives the parallel_for call that uses it.
unsafe impl Sync for OutPtr {}
// SAFETY: as above.
unsafe impl Send for OutPtr {}

/// The bytes of `x` (the F32 kernels read f32 activations as bytes).
fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: any f32 bit pattern is valid as bytes; same memory, 4x the length.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

/// Weight rows per task when processing several activation rows (keeps the tile in L1).
const PREFILL_TILE: usize = 16;

/// Fewest activation rows whose quantization is split over the compute pool (a decode step's
/// few rows stay on the calling thread: waking the pool costs more than it saves).
const PARALLEL_QUANTIZE_ROWS: usize = 32;

/// Quantizes every row of `x` (`cols` values each) into its `row_bytes` of `act`, rows split
/// over the compute pool when there are many (each row's bytes are the same either way).
fn quantize_rows(
    dtype: GgmlDType,
    (x, cols): (&[f32], usize),
    (act, row_bytes): (&mut [u8], usize),
) -> Result<(), QuantError> {
    let m = act.len() / row_bytes.max(1);
    let threads = num_threads();
    if m < PARALLEL_QUANTIZE_ROWS || threads < 2 {
        for (xr, ar) in x.chunks_exact(cols).zip(act.chunks_exact_mut(row_bytes)) {
            quantize_into(dtype, xr, ar)?;
        }
        return Ok(());
    }
    let per = m.div_ceil(threads);
    let parts: Vec<std::sync::Mutex<(&[f32], &mut [u8])>> = x
        .chunks(per * cols)
        .zip(act.chunks_mut(per * row_bytes))
        .map(std::sync::Mutex::new)
        .collect();
    let failed = std::sync::Mutex::new(None);
    parallel_for(parts.len(), &|t| {
        let mut part = parts[t].lock().unwrap_or_else(|p| p.into_inner());
        let (xs, acts) = &mut *part;
        for (xr, ar) in xs.chunks_exact(cols).zip(acts.chunks_exact_mut(row_bytes)) {
            if let Err(e) = quantize_into(dtype, xr, ar) {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return;
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl QMatrix {
    /// Wraps `bytes` as a `rows x cols` matrix of `dtype`, checking shape and length.
    pub fn new(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: WeightBytes,
    ) -> Result<Self, QuantError> {
        let row_bytes = dtype.row_bytes(cols).ok_or(QuantError::BadShape {
            dtype,
            rows,
            cols,
            reason: "cols is not a multiple of the block size",
        })?;
        let expected = row_bytes.checked_mul(rows).ok_or(QuantError::BadShape {
            dtype,
            rows,
            cols,
            reason: "size overflows",
        })?;
        if bytes.len() != expected {
            return Err(QuantError::SizeMismatch {
                what: "QMatrix bytes",
                expected,
                actual: bytes.len(),
            });
        }
        Ok(QMatrix {
            dtype,
            rows,
            cols,
            row_bytes,
            bytes,
            activations: Activations::Int8,
        })
    }

    /// The same matrix multiplying its activations as `activations` says (float weights
    /// always take f32 activations).
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }

    /// How products treat the activations (see [`Activations`]).
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Quantizes the row-major f32 `data` (`rows * cols`) to `dtype`.
    pub fn from_f32(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: &[f32],
    ) -> Result<Self, QuantError> {
        let n = rows.checked_mul(cols).ok_or(QuantError::BadShape {
            dtype,
            rows,
            cols,
            reason: "size overflows",
        })?;
        if data.len() != n {
            return Err(QuantError::SizeMismatch {
                what: "QMatrix::from_f32 data",
                expected: n,
                actual: data.len(),
            });
        }
        if dtype.row_bytes(cols).is_none() {
            return Err(QuantError::BadShape {
                dtype,
                rows,
                cols,
                reason: "cols is not a multiple of the block size",
            });
        }
        Self::new(dtype, rows, cols, quantize(dtype, data)?.into())
    }

    /// The weight format.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data.
    pub fn size_in_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The raw bytes of the whole matrix.
    pub fn bytes(&self) -> &WeightBytes {
        &self.bytes
    }

    /// The raw bytes of row `row`.
    ///
    /// # Panics
    /// If `row >= rows` (like slice indexing; [`QMatrix::dequantize_row`] checks instead).
    pub fn row_bytes_slice(&self, row: usize) -> &[u8] {
        &self.bytes[row * self.row_bytes..(row + 1) * self.row_bytes]
    }

    /// Dequantizes row `row` into `out` (`cols` long), e.g. an embedding lookup.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), QuantError> {
        if row >= self.rows {
            return Err(QuantError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        if out.len() != self.cols {
            return Err(QuantError::SizeMismatch {
                what: "dequantize_row output",
                expected: self.cols,
                actual: out.len(),
            });
        }
        dequantize(self.dtype, self.row_bytes_slice(row), out)
    }

    /// Dequantizes `out.len() / cols` consecutive rows starting at `first` into `out`.
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) -> Result<(), QuantError> {
        let n = out.len() / self.cols.max(1);
        if out.len() != n * self.cols || first.checked_add(n).is_none_or(|end| end > self.rows) {
            return Err(QuantError::RowOutOfRange {
                row: first.saturating_add(n),
                rows: self.rows,
            });
        }
        let bytes = &self.bytes[first * self.row_bytes..(first + n) * self.row_bytes];
        dequantize(self.dtype, bytes, out)
    }

    /// Dequantizes columns `cols` of rows `first .. first + n` into `out` (`n × cols.len()`,
    /// row-major), where `n = out.len() / cols.len()`. The column range must start and end on
    /// block boundaries of the format.
    pub fn dequantize_block(
        &self,
        first: usize,
        cols: std::ops::Range<usize>,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        let (bs, ts) = (self.dtype.block_size(), self.dtype.type_size());
        let width = cols.end.saturating_sub(cols.start);
        if cols.start > cols.end
            || cols.end > self.cols
            || !cols.start.is_multiple_of(bs)
            || !cols.end.is_multiple_of(bs)
        {
            return Err(QuantError::BadShape {
                dtype: self.dtype,
                rows: self.rows,
                cols: self.cols,
                reason: "a column range off the block boundaries",
            });
        }
        let n = out.len() / width.max(1);
        if out.len() != n * width || first.checked_add(n).is_none_or(|end| end > self.rows) {
            return Err(QuantError::RowOutOfRange {
                row: first.saturating_add(n),
                rows: self.rows,
            });
        }
        let bytes = (cols.start / bs * ts)..(cols.end / bs * ts);
        for (r, out) in out.chunks_exact_mut(width.max(1)).enumerate() {
            let row = self.row_bytes_slice(first + r);
            dequantize(self.dtype, &row[bytes.clone()], out)?;
        }
        Ok(())
    }

    /// The whole matrix as row-major f32 (`rows * cols`).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.rows * self.cols];
        // Cannot fail: the byte length was validated against the shape in `new`.
        let r = dequantize(self.dtype, &self.bytes, &mut v);
        debug_assert!(r.is_ok());
        v
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ` (row-major f32), parallel over output rows on the
    /// global pool. Activations are quantized to the weight's vec-dot type first, as ggml does.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), QuantError> {
        self.matmul_rows(0..self.rows, x, m, out)
    }

    /// [`QMatrix::matmul`] with the weight rows `rows` only: `out[m, rows.len()]`, the same
    /// numbers as those columns of the whole product (a part of a fused q/k/v matrix).
    pub fn matmul_rows(
        &self,
        rows: std::ops::Range<usize>,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) -> Result<(), QuantError> {
        if rows.start > rows.end || rows.end > self.rows {
            return Err(QuantError::RowOutOfRange {
                row: rows.end,
                rows: self.rows,
            });
        }
        let first = rows.start;
        let (rows, cols) = (rows.len(), self.cols);
        let x_len = m.checked_mul(cols);
        if x_len != Some(x.len()) {
            return Err(QuantError::SizeMismatch {
                what: "matmul input",
                expected: x_len.unwrap_or(usize::MAX),
                actual: x.len(),
            });
        }
        let out_len = m.checked_mul(rows);
        if out_len != Some(out.len()) {
            return Err(QuantError::SizeMismatch {
                what: "matmul output",
                expected: out_len.unwrap_or(usize::MAX),
                actual: out.len(),
            });
        }
        if m == 0 || rows == 0 {
            return Ok(());
        }
        match self.dtype.vec_dot_type() {
            Some(_) if self.activations == Activations::F32 => {
                self.matmul_dequantized(first..first + rows, x, m, out);
                Ok(())
            }
            None => {
                self.matmul_prepared(first..first + rows, f32_bytes(x), cols * 4, m, out);
                Ok(())
            }
            Some(vdt) => {
                let arb = vdt.row_bytes(cols).ok_or(QuantError::BadShape {
                    dtype: vdt,
                    rows: m,
                    cols,
                    reason: "cols is not a multiple of the activation block size",
                })?;
                with_scratch(arb * m, |act| {
                    quantize_rows(vdt, (x, cols), (act, arb))?;
                    self.matmul_prepared(first..first + rows, act, arb, m, out);
                    Ok(())
                })
            }
        }
    }

    /// Rows per task of a product over `rows` weight rows of `row_bytes` each with `m`
    /// activation rows: a few tasks per thread balance load; tiny matrices stay on one thread.
    fn task_rows(rows: usize, row_bytes: usize, m: usize) -> usize {
        let threads = num_threads();
        if m == 1 {
            if threads == 1 || rows * row_bytes < 16 * 1024 {
                rows
            } else {
                rows.div_ceil(threads * 4).max(8)
            }
        } else {
            PREFILL_TILE
        }
    }

    /// [`Activations::F32`]: weight rows dequantized `PREFILL_TILE` at a time into a per-thread
    /// tile that every activation row then reads, each (activation row, weight row) pair one dot
    /// of the F32 kernel, so a pair's result does not depend on the batch or the task split.
    /// (A kernel that multiplies a Q4_1 row as stored, without the tile, was slower here for a
    /// single activation row: 60 against 72 tok/s decoding at batch 1.)
    fn matmul_dequantized(
        &self,
        range: std::ops::Range<usize>,
        x: &[f32],
        m: usize,
        out: &mut [f32],
    ) {
        let (rows, cols, rb) = (range.len(), self.cols, self.row_bytes);
        let f32_dot = kernels().dot(GgmlDType::F32);
        let w: &[u8] = &self.bytes[range.start * rb..range.end * rb];
        let xb = f32_bytes(x);
        let chunk = Self::task_rows(rows, rb, m);
        let optr = OutPtr(out.as_mut_ptr());
        let put = move |i: usize, r: usize, v: f32| {
            // The whole wrapper, not its raw-pointer field, is what the closure may share.
            let optr = optr;
            // SAFETY: callers pass i < m and r < rows, so the index is inside `out` (m * rows
            // long); each (i, r) belongs to exactly one task (rows are split disjointly).
            debug_assert!(i < m && r < rows);
            unsafe { *optr.0.add(i * rows + r) = v };
        };
        let task = move |t: usize| {
            let (r0, r1) = (t * chunk, ((t + 1) * chunk).min(rows));
            with_buffer(&TILE, PREFILL_TILE.min(r1 - r0) * cols, |tile| {
                for s0 in (r0..r1).step_by(PREFILL_TILE) {
                    let s1 = (s0 + PREFILL_TILE).min(r1);
                    let tile = &mut tile[..(s1 - s0) * cols];
                    // Cannot fail: the byte length was validated against the shape in `new`.
                    let r = dequantize(self.dtype, &w[s0 * rb..s1 * rb], tile);
                    debug_assert!(r.is_ok());
                    let tile = f32_bytes(tile);
                    for (i, xi) in xb.chunks_exact(cols * 4).enumerate() {
                        for (r, wr) in (s0..s1).zip(tile.chunks_exact(cols * 4)) {
                            put(i, r, f32_dot(cols, wr, xi));
                        }
                    }
                }
            });
        };
        let n_tasks = rows.div_ceil(chunk);
        if n_tasks == 1 {
            task(0);
        } else {
            parallel_for(n_tasks, &task);
        }
    }

    /// The matmul proper over weight rows `range`, on activations already in vec-dot format
    /// (`m` rows of `arb` bytes).
    fn matmul_prepared(
        &self,
        range: std::ops::Range<usize>,
        act: &[u8],
        arb: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let (rows, cols, rb) = (range.len(), self.cols, self.row_bytes);
        let dot = kernels().dot(self.dtype);
        // Batch invariance: the server promises the same output alone or batched, and the
        // quantized model turns a one-ulp difference into a different token. So a pair's dot
        // product must not depend on the kernel that computed it: where 4x4 and 4x1 kernels
        // exist (same per-pair arithmetic) they compute every pair; elsewhere the one-row
        // kernel does. The AVX2 1x4 kernel reduces differently and stays opt-in
        // (`PREFIX_RFT_QUANT_FAST_BATCH=1`).
        let blocked = kernels().blocked(self.dtype);
        let dot4 = if blocked.is_none() && m >= 4 && fast_batch() {
            kernels().dot4(self.dtype)
        } else {
            None
        };
        let w: &[u8] = &self.bytes[range.start * rb..range.end * rb];
        // The blocked kernels read each activation block's f16 header as f32, made once here
        // for all weight tiles (two per block).
        let spr = 2 * (cols / 32);
        let scales = match (blocked, self.dtype.vec_dot_type()) {
            (Some(_), Some(vdt)) => {
                let mut s = vec![0f32; m * spr];
                for (row, out) in act.chunks_exact(arb).zip(s.chunks_exact_mut(spr)) {
                    activation_scales(vdt, row, out);
                }
                s
            }
            _ => Vec::new(),
        };
        let scales = &scales[..];
        let chunk = Self::task_rows(rows, rb, m);
        let n_tasks = rows.div_ceil(chunk);
        let optr = OutPtr(out.as_mut_ptr());
        let task = move |t: usize| {
            let optr = optr;
            let r0 = t * chunk;
            let r1 = (r0 + chunk).min(rows);
            // Activation rows outer (four at a time where a 4-row kernel exists), weight tile
            // inner: the tile stays in L1 while the activations stream past it once.
            let wrow = |r: usize| &w[r * rb..(r + 1) * rb];
            let put = |i: usize, r: usize, v: f32| {
                // SAFETY: callers pass i < m and r < rows, so the index is inside `out`
                // (m * rows long); each (i, r) is written by exactly one task (rows are split
                // disjointly between tasks).
                debug_assert!(i < m && r < rows);
                unsafe { *optr.0.add(i * rows + r) = v };
            };
            // Consecutive outputs of activation row `i` from weight row `r` on.
            let put_row = |i: usize, r: usize, v: &[f32]| {
                assert!(i < m && r + v.len() <= rows, "matmul output out of range");
                // SAFETY: in range (checked), and each (i, r) belongs to one task as above.
                unsafe {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), optr.0.add(i * rows + r), v.len())
                };
            };
            if let Some(tiled) = blocked {
                // Weight rows four at a time, packed once for all activation rows; a short
                // last group repeats its last row (same arithmetic per lane, results
                // discarded).
                with_buffer(&PACKED, cols / 32 * TILE_BLOCK_BYTES, |tile| {
                    let mut r = r0;
                    while r < r1 {
                        let rr = [0, 1, 2, 3].map(|k| (r + k).min(r1 - 1));
                        (tiled.pack)(cols, rr.map(wrow), tile);
                        let live = (r1 - r).min(4);
                        let mut i = 0;
                        while i + 4 <= m {
                            let a = [0, 1, 2, 3].map(|k| &act[(i + k) * arb..(i + k + 1) * arb]);
                            let s = [0, 1, 2, 3].map(|k| &scales[(i + k) * spr..(i + k + 1) * spr]);
                            let v = (tiled.k44)(cols, tile, a, s);
                            for (k, vk) in v.iter().enumerate() {
                                put_row(i + k, r, &vk[..live]);
                            }
                            i += 4;
                        }
                        for i in i..m {
                            let a = &act[i * arb..(i + 1) * arb];
                            let v = (tiled.k41)(cols, tile, a, &scales[i * spr..(i + 1) * spr]);
                            put_row(i, r, &v[..live]);
                        }
                        r += 4;
                    }
                });
                return;
            }
            let mut i = 0;
            if let Some(dot4) = dot4 {
                while i + 4 <= m {
                    let a = [0, 1, 2, 3].map(|k| &act[(i + k) * arb..(i + k + 1) * arb]);
                    for r in r0..r1 {
                        for (k, vk) in dot4(cols, wrow(r), a).into_iter().enumerate() {
                            put(i + k, r, vk);
                        }
                    }
                    i += 4;
                }
            }
            for i in i..m {
                let a = &act[i * arb..(i + 1) * arb];
                for r in r0..r1 {
                    put(i, r, dot(cols, wrow(r), a));
                }
            }
        };
        if n_tasks == 1 {
            task(0);
        } else {
            parallel_for(n_tasks, &task);
        }
    }
}
