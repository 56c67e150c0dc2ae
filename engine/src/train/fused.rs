//! Fused training ops: each is one custom op with a one-pass forward and a one-pass backward.
//!
//! The compositions in [`super::ops`] are what these compute, but candle runs a composition
//! as a chain of single-threaded passes, each allocating its result, and its backward adds
//! every partial gradient into a freshly zeroed buffer: the training step spent more time in
//! those passes and page faults than in its matmuls. Here each op reads its input once,
//! writes its output once, runs its rows on the compute pool, and differentiates in one more
//! pass (a second, non-differentiable op). They work in F32 and F64 (the gradient checks run
//! the same code in F64), on the CPU, with contiguous inputs.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use num_traits::{Float, One, Zero};

use crate::model::ggml;
use crate::quant::parallel_for;

/// Elements per task when rows are spread over the compute pool (smaller work stays on one
/// thread: waking the pool costs more than it saves).
const TASK_ELEMS: usize = 1 << 14;

/// A float element the fused ops compute in.
pub(crate) trait Elem: WithDType + Float {
    /// In place `x = exp(x − max)`, returning the sum of the results.
    fn exp_sum(x: &mut [Self], max: Self) -> Self {
        let mut sum = Self::zero();
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }

    /// Each value rounded to the nearest f16 (ggml's f16 keys, values and attention weights).
    fn round_f16(x: &mut [Self]) {
        for v in x.iter_mut() {
            *v = cast(half::f16::from_f64(v.to_f64()).to_f64());
        }
    }

    /// In-place soft-max of a row of scores, its weights rounded to f16 when `f16`.
    fn soft_max(x: &mut [Self], f16: bool) {
        soft_max_row(x, f16);
    }

    /// `out = silu(g) · u`, `silu(a) = a / (1 + e⁻ᵃ)`; `ggml` asks for ggml's arithmetic.
    fn swiglu(g: &[Self], u: &[Self], out: &mut [Self], _ggml: bool) {
        swiglu_plain(g, u, out);
    }
}
impl Elem for f32 {
    /// The serving soft-max's vectorised exponential (AVX2 where the CPU has it).
    fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        (crate::model::simd::kernels().exp_sum)(x, max)
    }

    fn round_f16(x: &mut [f32]) {
        ggml::f16_round_all(x);
    }

    /// With `f16`, the serving forward's ggml soft-max itself (its exponential, its sum).
    fn soft_max(x: &mut [f32], f16: bool) {
        if f16 {
            ggml::soft_max_f16(x);
        } else {
            soft_max_row(x, false);
        }
    }

    /// The serving forward's SwiGLU: ggml's vectorised one in ggml mode, else the plain one.
    fn swiglu(g: &[f32], u: &[f32], out: &mut [f32], ggml: bool) {
        if ggml {
            ggml::swiglu(g, u, out);
        } else {
            swiglu_plain(g, u, out);
        }
    }
}
impl Elem for f64 {}

/// [`Elem::soft_max`] in plain arithmetic: `exp(x − max) / Σ`.
fn soft_max_row<T: Elem>(x: &mut [T], f16: bool) {
    let max = x.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
    let sum = T::exp_sum(x, max);
    for v in x.iter_mut() {
        *v /= sum;
    }
    if f16 {
        T::round_f16(x);
    }
}

/// [`Elem::swiglu`] in plain arithmetic, as the serving forward outside ggml mode.
fn swiglu_plain<T: Elem>(g: &[T], u: &[T], out: &mut [T]) {
    for ((d, &a), &b) in out.iter_mut().zip(g).zip(u) {
        *d = a / (T::one() + (-a).exp()) * b;
    }
}

/// Dispatches `$body` with `T` bound to the storage's float type.
macro_rules! with_float {
    ($storage:expr, $name:expr, |$t:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            s => bail!("{}: f32 or f64 input expected, got {:?}", $name, s.dtype()),
        }
    };
}

/// The contiguous elements of `storage` under `layout`.
fn slice<'a, T: Elem>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// The width of the last dimension and the number of rows of a layout.
fn rows_of(layout: &Layout, what: &str) -> Result<(usize, usize)> {
    match layout.dims().last() {
        Some(&w) if w > 0 => Ok((layout.shape().elem_count() / w, w)),
        _ => bail!("{what}: input has no elements in its last dimension"),
    }
}

/// Output rows handed to tasks: each task writes only its own rows.
#[derive(Clone, Copy)]
struct RowsPtr<T>(*mut T);
// SAFETY: tasks write disjoint rows, and the buffer outlives the `parallel_for` using it.
unsafe impl<T> Send for RowsPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for RowsPtr<T> {}

impl<T> RowsPtr<T> {
    /// Writes element `i`.
    ///
    /// # Safety
    /// `i` must be inside the buffer, and no live slice may cover it.
    unsafe fn write(&self, i: usize, v: T) {
        self.0.add(i).write(v)
    }

    /// Elements `start .. start + len`.
    ///
    /// # Safety
    /// `start + len` must be within the buffer, and no other live slice may overlap the span.
    #[allow(clippy::mut_from_ref)]
    unsafe fn span(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// Row `r` of width `w`.
    ///
    /// # Safety
    /// `(r + 1) * w` must be within the buffer, and no other live slice may overlap the row.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, w: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(r * w), w)
    }
}

/// A new `rows × width` buffer whose row `r` is written by `f(r, row)`, rows spread over the
/// compute pool; `cost` is the elements one row reads (at least its width).
pub(crate) fn map_rows<T: Elem>(
    rows: usize,
    width: usize,
    cost: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); rows * width];
    let per_task = (TASK_ELEMS / cost.max(width).max(1)).max(1);
    let ptr = RowsPtr(out.as_mut_ptr());
    parallel_for(rows.div_ceil(per_task), &|t| {
        for r in t * per_task..((t + 1) * per_task).min(rows) {
            // SAFETY: r < rows, so the row is inside `out`; each row belongs to one task.
            f(r, unsafe { ptr.row(r, width) });
        }
    });
    out
}

/// `f(r, row)` on every row of `buf` (`width` values each) in place, rows spread over the
/// compute pool as [`map_rows`] spreads them.
pub(crate) fn for_rows_mut<T: Elem>(
    buf: &mut [T],
    width: usize,
    cost: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let rows = buf.len() / width.max(1);
    let per_task = (TASK_ELEMS / cost.max(width).max(1)).max(1);
    let ptr = RowsPtr(buf.as_mut_ptr());
    parallel_for(rows.div_ceil(per_task), &|t| {
        for r in t * per_task..((t + 1) * per_task).min(rows) {
            // SAFETY: r < rows, so the row is inside `buf`; each row belongs to one task.
            f(r, unsafe { ptr.row(r, width) });
        }
    });
}

fn cast<T: Elem>(v: f64) -> T {
    T::from_f64(v)
}

/// RMSNorm over the last dimension, `x / sqrt(mean(x²) + eps) · w`, as the serving forward
/// computes it. Differentiable in `x` only (norm weights are frozen).
#[derive(Debug, Clone, Copy)]
pub struct RmsNorm {
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    fn inv<T: Elem>(&self, row: &[T]) -> T {
        let ss = row.iter().fold(T::zero(), |a, &v| a + v * v) / cast(row.len() as f64);
        T::one() / (ss + cast(self.eps)).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, n) = rows_of(xl, self.name())?;
        if wl.shape().elem_count() != n {
            bail!("{}: weight of {:?} for rows of {n}", self.name(), wl.dims());
        }
        with_float!(xs, self.name(), |T| {
            let x = slice::<T>(xs, xl, self.name())?;
            let w = slice::<T>(ws, wl, self.name())?;
            let out = map_rows(rows, n, n, |r, dst: &mut [T]| {
                let row = &x[r * n..(r + 1) * n];
                let inv = self.inv(row);
                for ((d, &v), &wv) in dst.iter_mut().zip(row).zip(w) {
                    *d = v * inv * wv;
                }
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let gx = x
            .contiguous()?
            .apply_op3_no_bwd(&w.contiguous()?, &g, &RmsNormBackward(*self))?;
        Ok((Some(gx), None))
    }
}

/// `∂/∂x` of [`RmsNorm`]: with `r = 1/sqrt(mean(x²) + eps)` and `h = g·w`,
/// `r·h − x·r³·mean(h·x)`.
struct RmsNormBackward(RmsNorm);

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "fused-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, n) = rows_of(xl, self.name())?;
        with_float!(xs, self.name(), |T| {
            let x = slice::<T>(xs, xl, self.name())?;
            let w = slice::<T>(ws, wl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            if w.len() != n || g.len() != x.len() {
                bail!("{}: mismatched shapes", self.name());
            }
            let out = map_rows(rows, n, n, |r, dst: &mut [T]| {
                let (xr, gr) = (&x[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
                let inv = self.0.inv(xr);
                let dot = xr
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .fold(T::zero(), |a, ((&xv, &gv), &wv)| a + gv * wv * xv);
                let k = inv * inv * inv * dot / cast::<T>(n as f64);
                for (((d, &xv), &gv), &wv) in dst.iter_mut().zip(xr).zip(gr).zip(w) {
                    *d = inv * gv * wv - xv * k;
                }
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

/// `silu(gate) · up` with `silu(a) = a / (1 + e⁻ᵃ)` (the serving forward's SwiGLU; `ggml`:
/// in ggml's arithmetic, as the serving forward of a GGUF model).
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu {
    pub ggml: bool,
}

fn sigmoid<T: Elem>(a: T) -> T {
    T::one() / (T::one() + (-a).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            bail!(
                "{}: gate {:?} and up {:?}",
                self.name(),
                gl.dims(),
                ul.dims()
            );
        }
        let (rows, n) = rows_of(gl, self.name())?;
        with_float!(gs, self.name(), |T| {
            let a = slice::<T>(gs, gl, self.name())?;
            let b = slice::<T>(us, ul, self.name())?;
            let out = map_rows(rows, n, n, |r, dst: &mut [T]| {
                T::swiglu(
                    &a[r * n..(r + 1) * n],
                    &b[r * n..(r + 1) * n],
                    dst,
                    self.ggml,
                );
            });
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gate.contiguous()?.apply_op3_no_bwd(
            &up.contiguous()?,
            &grad.contiguous()?,
            &SwiGluBackward,
        )?;
        let shape = gate.shape();
        let n = shape.elem_count();
        let flat = both.flatten_all()?;
        Ok((
            Some(flat.narrow(0, 0, n)?.reshape(shape)?),
            Some(flat.narrow(0, n, n)?.reshape(shape)?),
        ))
    }
}

/// Both gradients of [`SwiGlu`] in one buffer `[2, ..]`: `g·up·σ(a)(1 + a(1 − σ(a)))` for the
/// gate, then `g·silu(a)` for up.
struct SwiGluBackward;

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "fused-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, n) = rows_of(gl, self.name())?;
        let total = rows * n;
        with_float!(gs, self.name(), |T| {
            let a = slice::<T>(gs, gl, self.name())?;
            let b = slice::<T>(us, ul, self.name())?;
            let g = slice::<T>(ds, dl, self.name())?;
            if b.len() != total || g.len() != total {
                bail!("{}: mismatched shapes", self.name());
            }
            // Rows 0..rows hold the gate's gradient, rows..2·rows up's.
            let out = map_rows(2 * rows, n, n, |r, dst: &mut [T]| {
                let (for_up, r) = (r >= rows, r % rows);
                let span = r * n..(r + 1) * n;
                let (ar, br, gr) = (&a[span.clone()], &b[span.clone()], &g[span]);
                for (i, d) in dst.iter_mut().enumerate() {
                    let s = sigmoid(ar[i]);
                    *d = if for_up {
                        gr[i] * ar[i] * s
                    } else {
                        gr[i] * br[i] * s * (T::one() + ar[i] * (T::one() - s))
                    };
                }
            });
            let mut dims = vec![2];
            dims.extend_from_slice(gl.dims());
            Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
        })
    }
}

/// The rotary table [`Heads`] rotates by, for positions `start .. start + len`:
/// `(x₁, x₂) ↦ (x₁ cos − x₂ sin, x₂ cos + x₁ sin)`, with angles formed in f64 and rounded
/// once to the compute type, as the serving table is.
#[derive(Debug, Clone)]
pub struct Rope {
    len: usize,
    half: usize,
    cos: Vec<f64>,
    sin: Vec<f64>,
}

impl Rope {
    /// Tables for `len` positions from `start` with the given inverse frequencies.
    pub fn new(inv_freq: &[f32], start: usize, len: usize) -> Self {
        let half = inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(len * half),
            Vec::with_capacity(len * half),
        );
        for p in start..start + len {
            for &f in inv_freq {
                // Kept in f64 and rounded once to the compute type when applied, so an F32 run
                // rotates by the serving table's numbers.
                let a = p as f64 * f as f64;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Rope {
            len,
            half,
            cos,
            sin,
        }
    }
}

/// Rows `[b · len, heads · hd]` (a projection's output) → heads `[b, heads, len, hd]`,
/// rotated by `rope` when given: the reshape, transpose, copy and rotation of the
/// composition in one pass each way.
#[derive(Debug, Clone)]
pub struct Heads {
    /// Sequences.
    pub b: usize,
    /// Positions per sequence.
    pub len: usize,
    /// Heads in a row.
    pub heads: usize,
    /// Width of a head.
    pub hd: usize,
    /// The rotary table for the `len` positions (queries and keys), or none (values).
    pub rope: Option<Rope>,
    /// Round every output value to f16 and back (what llama.cpp's f16 attention computes
    /// with). The backward passes the gradient straight through the rounding, in full
    /// precision.
    pub f16: bool,
}

impl Heads {
    fn check(&self, dims: &[usize], want: &[usize]) -> Result<()> {
        if dims != want {
            bail!("heads: input {dims:?}, expected {want:?}");
        }
        if let Some(r) = &self.rope {
            if r.len != self.len || 2 * r.half != self.hd {
                bail!(
                    "heads: rotary table for {} positions of {}",
                    r.len,
                    2 * r.half
                );
            }
        }
        Ok(())
    }

    /// Copies head `src` to `dst`, rotated for position `p` (inversely when `inverse`).
    fn place<T: Elem>(
        &self,
        tables: &Option<(Vec<T>, Vec<T>)>,
        p: usize,
        src: &[T],
        dst: &mut [T],
        inverse: bool,
    ) {
        let Some((cos, sin)) = tables else {
            dst.copy_from_slice(src);
            return;
        };
        let h = self.hd / 2;
        let (c, s) = (&cos[p * h..(p + 1) * h], &sin[p * h..(p + 1) * h]);
        let (x1, x2) = src.split_at(h);
        let (lo, hi) = dst.split_at_mut(h);
        for i in 0..h {
            let si = if inverse { -s[i] } else { s[i] };
            lo[i] = x1[i] * c[i] - x2[i] * si;
            hi[i] = x2[i] * c[i] + x1[i] * si;
        }
    }

    fn tables<T: Elem>(&self) -> Option<(Vec<T>, Vec<T>)> {
        self.rope.as_ref().map(|r| {
            (
                r.cos.iter().map(|&v| cast(v)).collect(),
                r.sin.iter().map(|&v| cast(v)).collect(),
            )
        })
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "fused-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, len, heads, hd) = (self.b, self.len, self.heads, self.hd);
        self.check(layout.dims(), &[b * len, heads * hd])?;
        with_float!(storage, self.name(), |T| {
            let x = slice::<T>(storage, layout, self.name())?;
            let tables = self.tables::<T>();
            let out = map_rows(b * heads * len, hd, hd, |r, dst: &mut [T]| {
                let (i, h, p) = (r / (heads * len), r / len % heads, r % len);
                let src = &x[(i * len + p) * heads * hd + h * hd..][..hd];
                self.place(&tables, p, src, dst, false);
                if self.f16 {
                    T::round_f16(dst);
                }
            });
            Ok((
                T::to_cpu_storage_owned(out),
                Shape::from((b, heads, len, hd)),
            ))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&HeadsBackward(self))?,
        ))
    }
}

/// `∂/∂rows` of [`Heads`]: heads back to rows, rotated back.
struct HeadsBackward<'a>(&'a Heads);

impl CustomOp1 for HeadsBackward<'_> {
    fn name(&self) -> &'static str {
        "fused-heads-backward"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = self.0;
        let (b, len, heads, hd) = (h.b, h.len, h.heads, h.hd);
        h.check(layout.dims(), &[b, heads, len, hd])?;
        with_float!(storage, self.name(), |T| {
            let g = slice::<T>(storage, layout, self.name())?;
            let tables = h.tables::<T>();
            let out = map_rows(b * len, heads * hd, heads * hd, |r, dst: &mut [T]| {
                let (i, p) = (r / len, r % len);
                for (hh, d) in dst.chunks_exact_mut(hd).enumerate() {
                    let src = &g[((i * heads + hh) * len + p) * hd..][..hd];
                    h.place(&tables, p, src, d, true);
                }
            });
            Ok((
                T::to_cpu_storage_owned(out),
                Shape::from((b * len, heads * hd)),
            ))
        })
    }
}

/// `log_softmax(logits)[n, targets[n]]` for logits `[rows, vocab]` → `[rows]`, without the
/// `[rows, vocab]` intermediates of the composition (only the input is kept for the
/// backward, which recomputes the softmax).
#[derive(Debug, Clone)]
pub struct LogSoftmaxGather {
    targets: Vec<u32>,
}

impl LogSoftmaxGather {
    /// One target id per row.
    pub fn new(targets: Vec<u32>) -> Self {
        LogSoftmaxGather { targets }
    }

    fn check(&self, layout: &Layout, what: &str) -> Result<(usize, usize)> {
        let (rows, vocab) = rows_of(layout, what)?;
        check_targets(&self.targets, (rows, vocab), what)?;
        Ok((rows, vocab))
    }
}

/// One target id per row, each inside the vocabulary.
pub(crate) fn check_targets(
    targets: &[u32],
    (rows, vocab): (usize, usize),
    what: &str,
) -> Result<()> {
    if rows != targets.len() {
        bail!("{what}: {rows} rows for {} targets", targets.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("{what}: target {t} outside a vocabulary of {vocab}");
    }
    Ok(())
}

/// `max + ln Σ exp(x − max)` of one row (the exponentials a stack buffer at a time).
pub(crate) fn log_sum_exp<T: Elem>(row: &[T]) -> T {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
    let mut buf = [T::zero(); 256];
    let mut sum = T::zero();
    for c in row.chunks(buf.len()) {
        let b = &mut buf[..c.len()];
        b.copy_from_slice(c);
        sum += T::exp_sum(b, max);
    }
    max + sum.ln()
}

impl CustomOp1 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = self.check(layout, self.name())?;
        with_float!(storage, self.name(), |T| {
            let x = slice::<T>(storage, layout, self.name())?;
            let out = map_rows(rows, 1, vocab, |r, dst: &mut [T]| {
                let row = &x[r * vocab..(r + 1) * vocab];
                dst[0] = row[self.targets[r] as usize] - log_sum_exp(row);
            });
            Ok((T::to_cpu_storage_owned(out), Shape::from(rows)))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &LogSoftmaxGatherBackward(self))?;
        Ok(Some(g))
    }
}

/// `row` (logits) replaced by `∂(g · log_softmax(row)[target])/∂row`:
/// `g · (onehot(target) − softmax(row))`.
pub(crate) fn log_softmax_grad_row<T: Elem>(row: &mut [T], target: usize, g: T) {
    let lse = log_sum_exp(row);
    T::exp_sum(row, lse);
    for d in row.iter_mut() {
        *d *= -g;
    }
    row[target] += g;
}

/// `∂/∂logits` of [`LogSoftmaxGather`]: `g[n] · (onehot(target) − softmax(logits[n]))`.
struct LogSoftmaxGatherBackward<'a>(&'a LogSoftmaxGather);

impl CustomOp2 for LogSoftmaxGatherBackward<'_> {
    fn name(&self) -> &'static str {
        "fused-log-softmax-gather-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = self.0.check(xl, self.name())?;
        with_float!(xs, self.name(), |T| {
            let x = slice::<T>(xs, xl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            if g.len() != rows {
                bail!("{}: {} gradients for {rows} rows", self.name(), g.len());
            }
            let out = map_rows(rows, vocab, vocab, |r, dst: &mut [T]| {
                let gr = g[r];
                if gr == T::zero() {
                    return; // masked position: its row stays zero
                }
                dst.copy_from_slice(&x[r * vocab..(r + 1) * vocab]);
                log_softmax_grad_row(dst, self.0.targets[r] as usize, gr);
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

/// One operand of [`gemm_into`]: the elements and their column and row strides.
type Operand<'a, T> = (&'a [T], isize, isize);

/// `dst[m, n] (+)= beta · lhs[m, k] · rhs[k, n]` (`dst` row-major; accumulates when `acc`),
/// its rows split over the compute pool (one pool for every kernel of a step: a second one,
/// such as rayon's, would spin against it for the same cores).
pub(crate) fn gemm_into<T: Elem>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    acc: bool,
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
    beta: T,
) {
    let (m, n, _) = dims;
    let threads = crate::quant::num_threads();
    if threads < 2 || m < 2 * GEMM_MIN_ROWS {
        gemm_strided(dims, (dst, n), acc, lhs, rhs, beta);
        return;
    }
    let rows = m.div_ceil(threads).max(GEMM_MIN_ROWS);
    let dst_len = dst.len();
    let ptr = RowsPtr(dst.as_mut_ptr());
    parallel_for(m.div_ceil(rows), &|t| {
        let (r0, r1) = (t * rows, ((t + 1) * rows).min(m));
        let rs = lhs.2.max(0) as usize;
        // SAFETY: tasks take disjoint row ranges r0..r1 of `dst` (n elements per row, checked
        // against its length here), so their slices do not overlap.
        assert!(r1 * n <= dst_len, "gemm destination too small");
        let d = unsafe { ptr.span(r0 * n, (r1 - r0) * n) };
        let l = (lhs.0.get(r0 * rs..).unwrap_or_default(), lhs.1, lhs.2);
        gemm_strided((r1 - r0, n, dims.2), (d, n), acc, l, rhs, beta);
    });
}

/// Columns `c0 .. c0 + width` of a row-major destination `[rows, ld]`: what one task of
/// [`column_windows`] writes while the others write theirs.
pub(crate) struct ColumnWindow<T> {
    ptr: RowsPtr<T>,
    rows: usize,
    ld: usize,
    c0: usize,
    width: usize,
}

impl<T: Elem> ColumnWindow<T> {
    /// The window's columns.
    pub(crate) fn cols(&self) -> std::ops::Range<usize> {
        self.c0..self.c0 + self.width
    }

    /// `window (+)= lhs[rows, k] · rhs[k, width]` on the calling thread (accumulates when
    /// `acc`).
    pub(crate) fn gemm(&mut self, k: usize, acc: bool, lhs: Operand<'_, T>, rhs: Operand<'_, T>) {
        if self.rows == 0 || self.width == 0 {
            return;
        }
        check_operand(lhs.0.len(), (self.rows, k), lhs.1, lhs.2);
        check_operand(rhs.0.len(), (k, self.width), rhs.1, rhs.2);
        // SAFETY: the window lies inside the destination (checked by `column_windows`), no
        // other task's window shares a column with it, and the inputs are shared borrows of
        // other buffers, so nothing else reads or writes these elements meanwhile.
        unsafe {
            gemm_raw(
                (self.rows, self.width, k),
                (self.ptr.0.add(self.c0), self.ld),
                acc,
                lhs,
                rhs,
                T::one(),
            );
        }
    }
}

/// Runs `f(i, window)` on the compute pool for the column windows `bounds[i] .. bounds[i +
/// 1]` of the row-major `dst` `[rows, ld]` (`bounds` ascending, from 0 to at most `ld`): a
/// product whose right-hand side is produced in pieces (a dequantised weight) is split by
/// output column, so every task makes and uses only its own piece.
pub(crate) fn column_windows<T: Elem>(
    dst: &mut [T],
    (rows, ld): (usize, usize),
    bounds: &[usize],
    f: &(dyn Fn(usize, ColumnWindow<T>) + Sync),
) {
    assert!(
        rows * ld <= dst.len(),
        "column windows past the destination"
    );
    assert!(
        bounds.windows(2).all(|w| w[0] <= w[1]) && bounds.last().is_none_or(|&e| e <= ld),
        "column window bounds out of order"
    );
    let ptr = RowsPtr(dst.as_mut_ptr());
    parallel_for(bounds.len().saturating_sub(1), &|i| {
        f(
            i,
            ColumnWindow {
                ptr,
                rows,
                ld,
                c0: bounds[i],
                width: bounds[i + 1] - bounds[i],
            },
        )
    });
}

/// Fewest rows worth a task of their own in [`gemm_into`].
const GEMM_MIN_ROWS: usize = 16;

/// The last element an operand of `rows × cols` with these strides addresses, checked to be
/// inside `len` elements.
fn check_operand(len: usize, (rows, cols): (usize, usize), cs: isize, rs: isize) {
    let last = (rows.saturating_sub(1) as isize) * rs + (cols.saturating_sub(1) as isize) * cs;
    assert!(
        rows == 0 || cols == 0 || (cs >= 0 && rs >= 0 && (last as usize) < len),
        "gemm operand out of bounds"
    );
}

/// [`gemm_into`] on the calling thread, with a destination row stride.
fn gemm_strided<T: Elem>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [T], usize),
    acc: bool,
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
    beta: T,
) {
    check_operand(dst.len(), (m, n), 1, dst_rs as isize);
    check_operand(lhs.0.len(), (m, k), lhs.1, lhs.2);
    check_operand(rhs.0.len(), (k, n), rhs.1, rhs.2);
    // SAFETY: every operand's strides address only elements inside its slice (checked
    // above), and `dst` is a unique borrow, so it overlaps neither input.
    unsafe { gemm_raw((m, n, k), (dst.as_mut_ptr(), dst_rs), acc, lhs, rhs, beta) }
}

/// `dst (+)= beta · lhs · rhs` with the gemm crate on the calling thread.
///
/// # Safety
/// `dst` must address `m × n` elements at row stride `dst_rs` that nothing else reads or
/// writes meanwhile, and each operand's strides must stay inside its slice.
unsafe fn gemm_raw<T: Elem>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    acc: bool,
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        acc,
        lhs.0.as_ptr(),
        lhs.1,
        lhs.2,
        rhs.0.as_ptr(),
        rhs.1,
        rhs.2,
        T::one(),
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// A LoRA delta `scale · (x Aᵀ) Bᵀ` for `x` `[rows, in]`, `A` `[r, in]`, `B` `[out, r]`, as one
/// op: two GEMMs forward, four backward, instead of two matmul, two transpose and one scale
/// nodes each with a zeroed gradient buffer.
#[derive(Debug, Clone, Copy)]
pub struct LoraDelta {
    /// `alpha / r` (or `alpha / √r`).
    pub scale: f64,
}

impl LoraDelta {
    /// `(rows, in, r, out)` of `x`, `A` and `B`, checked to chain.
    pub(crate) fn dims(
        &self,
        x: &[usize],
        a: &[usize],
        b: &[usize],
    ) -> Result<(usize, usize, usize, usize)> {
        match (x, a, b) {
            (&[m, i], &[r, ia], &[o, rb]) if i == ia && r == rb => Ok((m, i, r, o)),
            _ => bail!("lora delta: x {x:?}, A {a:?}, B {b:?} do not chain"),
        }
    }

    /// The delta `[m, o]` of row-major `x`, `A` and `B` of `dims` (from [`LoraDelta::dims`]),
    /// written into `out`.
    pub(crate) fn values_into<T: Elem>(
        &self,
        (x, a, b): (&[T], &[T], &[T]),
        (m, i, r, o): (usize, usize, usize, usize),
        out: &mut [T],
    ) {
        let mut u = vec![T::zero(); m * r];
        gemm_into(
            (m, r, i),
            &mut u,
            false,
            (x, 1, i as isize),
            (a, i as isize, 1),
            T::one(),
        );
        gemm_into(
            (m, o, r),
            out,
            false,
            (&u, 1, r as isize),
            (b, r as isize, 1),
            cast::<T>(self.scale),
        );
    }
}

impl CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "fused-lora-delta"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(xl.dims(), al.dims(), bl.dims())?;
        with_float!(xs, self.name(), |T| {
            let x = slice::<T>(xs, xl, self.name())?;
            let a = slice::<T>(as_, al, self.name())?;
            let b = slice::<T>(bs, bl, self.name())?;
            let mut out = vec![T::zero(); dims.0 * dims.3];
            self.values_into((x, a, b), dims, &mut out);
            Ok((T::to_cpu_storage_owned(out), Shape::from((dims.0, dims.3))))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, i, r, o) = self.dims(x.dims(), a.dims(), b.dims())?;
        match x.dtype() {
            DType::F32 => self.grads::<f32>(x, a, b, grad, (m, i, r, o)),
            DType::F64 => self.grads::<f64>(x, a, b, grad, (m, i, r, o)),
            dt => bail!("{}: f32 or f64 expected, got {dt:?}", self.name()),
        }
    }
}

impl LoraDelta {
    /// The three gradients, with `gb = g·B`: `s·gb·A` for x, `s·gbᵀ·x` for A and
    /// `s·gᵀ·(x Aᵀ)` for B.
    #[allow(clippy::type_complexity)]
    fn grads<T: Elem>(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
        (m, i, r, o): (usize, usize, usize, usize),
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let (xv, av, bv, g) = (host(x)?, host(a)?, host(b)?, host(grad)?);
        let mut gx = vec![T::zero(); m * i];
        let (ga, gbb) = self.grads_into((&xv, &av, &bv, &g), (m, i, r, o), (&mut gx, false));
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(gx, (m, i), dev)?),
            Some(Tensor::from_vec(ga, (r, i), dev)?),
            Some(Tensor::from_vec(gbb, (o, r), dev)?),
        ))
    }

    /// The gradients of A and B, and x's written into `gx` (added to it when `acc`), for
    /// row-major `x`, `A`, `B` and output gradient `g` of `dims`.
    pub(crate) fn grads_into<T: Elem>(
        &self,
        (xv, av, bv, g): (&[T], &[T], &[T], &[T]),
        (m, i, r, o): (usize, usize, usize, usize),
        (gx, acc): (&mut [T], bool),
    ) -> (Vec<T>, Vec<T>) {
        let (ii, ri, oi) = (i as isize, r as isize, o as isize);
        let s = cast::<T>(self.scale);
        let mut gb = vec![T::zero(); m * r];
        gemm_into((m, r, o), &mut gb, false, (g, 1, oi), (bv, 1, ri), T::one());
        gemm_into((m, i, r), gx, acc, (&gb, 1, ri), (av, 1, ii), s);
        let mut ga = vec![T::zero(); r * i];
        gemm_into((r, i, m), &mut ga, false, (&gb, ri, 1), (xv, 1, ii), s);
        let mut u = vec![T::zero(); m * r];
        gemm_into((m, r, i), &mut u, false, (xv, 1, ii), (av, ii, 1), T::one());
        let mut gbb = vec![T::zero(); o * r];
        gemm_into((o, r, m), &mut gbb, false, (g, oi, 1), (&u, 1, ri), s);
        (ga, gbb)
    }
}

/// Causal grouped-query attention as one op: `q` `[b, heads, len, hd]`, `k` and `v`
/// `[b, kv_heads, past + len, hd]` → `[b · len, heads · hd]` (rows ready for the output
/// projection). Query `i` sees keys `0..=past + i`; query head `h` reads key/value head
/// `h / (heads / kv_heads)`. The backward recomputes the probabilities instead of keeping
/// them, and sums each key/value head's gradient over its query heads.
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    /// `1/√hd`.
    pub scale: f64,
    /// Keys before the first query.
    pub past: usize,
    /// Round the attention weights to f16 before they multiply the values, as the serving
    /// forward does in llama.cpp's arithmetic (the gradient passes the rounding unchanged).
    pub f16_weights: bool,
}

/// Shapes of one [`Attention`] call.
#[derive(Debug, Clone, Copy)]
struct AttnDims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    len: usize,
    keys: usize,
    hd: usize,
}

impl AttnDims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    fn q_off(&self, i: usize, h: usize) -> usize {
        (i * self.heads + h) * self.len * self.hd
    }
    fn kv_off(&self, i: usize, kh: usize) -> usize {
        (i * self.kv_heads + kh) * self.keys * self.hd
    }
}

impl Attention {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<AttnDims> {
        match (q, k, v) {
            (&[b, heads, len, hd], &[kb, kv_heads, keys, khd], v)
                if v == k
                    && kb == b
                    && khd == hd
                    && kv_heads > 0
                    && heads % kv_heads == 0
                    && keys == self.past + len =>
            {
                Ok(AttnDims {
                    b,
                    heads,
                    kv_heads,
                    len,
                    keys,
                    hd,
                })
            }
            _ => bail!(
                "attention: q {q:?}, k {k:?}, v {v:?} after {} past keys do not fit",
                self.past
            ),
        }
    }

    /// Probabilities `[len, keys]` of query head `h` of sequence `i` (hidden keys 0).
    fn probs<T: Elem>(&self, d: AttnDims, q: &[T], k: &[T], i: usize, h: usize) -> Vec<T> {
        let (len, keys, hd) = (d.len, d.keys, d.hd);
        let qh = &q[d.q_off(i, h)..][..len * hd];
        let kh = &k[d.kv_off(i, h / d.group())..][..keys * hd];
        let mut p = vec![T::zero(); len * keys];
        let ki = hd as isize;
        gemm_strided(
            (len, keys, hd),
            (&mut p, keys),
            false,
            (qh, 1, ki),
            (kh, ki, 1),
            T::one(),
        );
        let scale: T = cast(self.scale);
        for (r, row) in p.chunks_exact_mut(keys).enumerate() {
            let (seen, hidden) = row.split_at_mut(self.past + r + 1);
            seen.iter_mut().for_each(|x| *x *= scale);
            T::soft_max(seen, self.f16_weights);
            hidden.iter_mut().for_each(|x| *x = T::zero());
        }
        p
    }

    fn forward<T: Elem>(&self, d: AttnDims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (len, keys, hd) = (d.len, d.keys, d.hd);
        let width = d.heads * hd;
        let mut out = vec![T::zero(); d.b * len * width];
        let ptr = RowsPtr(out.as_mut_ptr());
        parallel_for(d.b * d.heads, &|task| {
            let (i, h) = (task / d.heads, task % d.heads);
            let p = self.probs(d, q, k, i, h);
            let vh = &v[d.kv_off(i, h / d.group())..][..keys * hd];
            let mut o = vec![T::zero(); len * hd];
            let hi = hd as isize;
            gemm_strided(
                (len, hd, keys),
                (&mut o, hd),
                false,
                (&p, 1, keys as isize),
                (vh, 1, hi),
                T::one(),
            );
            for (r, row) in o.chunks_exact(hd).enumerate() {
                let at = (i * len + r) * width + h * hd;
                for (c, &x) in row.iter().enumerate() {
                    // SAFETY: `at + c` < b·len·width; each (row, head column) element is
                    // written by the one task owning head h of sequence i.
                    unsafe { ptr.write(at + c, x) };
                }
            }
        });
        out
    }

    /// `(dq, dk, dv)` from the output gradient `g` `[b · len, heads · hd]`.
    #[allow(clippy::type_complexity)]
    fn backward<T: Elem>(
        &self,
        d: AttnDims,
        (q, k, v): (&[T], &[T], &[T]),
        g: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (len, keys, hd, group) = (d.len, d.keys, d.hd, d.group());
        let width = d.heads * hd;
        let (ki, hi, wi) = (keys as isize, hd as isize, width as isize);
        let mut dq = vec![T::zero(); q.len()];
        let mut dk = vec![T::zero(); k.len()];
        let mut dv = vec![T::zero(); v.len()];
        let (pq, pk, pv) = (
            RowsPtr(dq.as_mut_ptr()),
            RowsPtr(dk.as_mut_ptr()),
            RowsPtr(dv.as_mut_ptr()),
        );
        let scale: T = cast(self.scale);
        parallel_for(d.b * d.kv_heads, &|task| {
            let (i, kh) = (task / d.kv_heads, task % d.kv_heads);
            // SAFETY: task (i, kh) owns block `task` of dk and dv (keys·hd each) and the
            // `group` consecutive query heads of dq that read kv head kh (group·len·hd).
            let (dkh, dvh, dqg) = unsafe {
                (
                    pk.row(task, keys * hd),
                    pv.row(task, keys * hd),
                    pq.row(task, group * len * hd),
                )
            };
            let kh_s = &k[d.kv_off(i, kh)..][..keys * hd];
            let vh_s = &v[d.kv_off(i, kh)..][..keys * hd];
            for gi in 0..group {
                let h = kh * group + gi;
                let p = self.probs(d, q, k, i, h);
                let go = &g[i * len * width + h * hd..];
                let qh = &q[d.q_off(i, h)..][..len * hd];
                // dP = dO · Vᵀ
                let mut dp = vec![T::zero(); len * keys];
                gemm_strided(
                    (len, keys, hd),
                    (&mut dp, keys),
                    false,
                    (go, 1, wi),
                    (vh_s, hi, 1),
                    T::one(),
                );
                // dV += Pᵀ · dO
                gemm_strided(
                    (keys, hd, len),
                    (dvh, hd),
                    true,
                    (&p, ki, 1),
                    (go, 1, wi),
                    T::one(),
                );
                // dS = scale · P ⊙ (dP − Σ P·dP), in place in dp
                for (pr, dr) in p.chunks_exact(keys).zip(dp.chunks_exact_mut(keys)) {
                    let dot = pr
                        .iter()
                        .zip(dr.iter())
                        .fold(T::zero(), |a, (&x, &y)| a + x * y);
                    for (x, &pv_) in dr.iter_mut().zip(pr) {
                        *x = scale * pv_ * (*x - dot);
                    }
                }
                // dQ = dS · K
                gemm_strided(
                    (len, hd, keys),
                    (&mut dqg[gi * len * hd..(gi + 1) * len * hd], hd),
                    false,
                    (&dp, 1, ki),
                    (kh_s, 1, hi),
                    T::one(),
                );
                // dK += dSᵀ · Q
                gemm_strided(
                    (keys, hd, len),
                    (dkh, hd),
                    true,
                    (&dp, ki, 1),
                    (qh, 1, hi),
                    T::one(),
                );
            }
        });
        (dq, dk, dv)
    }

    fn grads<T: Elem>(
        &self,
        d: AttnDims,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let (qv, kv, vv, g) = (host(q)?, host(k)?, host(v)?, host(grad)?);
        let (dq, dk, dv) = self.backward(d, (&qv, &kv, &vv), &g);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        let shape = Shape::from((d.b * d.len, d.heads * d.hd));
        with_float!(qs, self.name(), |T| {
            let q = slice::<T>(qs, ql, self.name())?;
            let k = slice::<T>(ks, kl, self.name())?;
            let v = slice::<T>(vs, vl, self.name())?;
            Ok((T::to_cpu_storage_owned(self.forward(d, q, k, v)), shape))
        })
    }

    #[allow(clippy::type_complexity)]
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.dims(), k.dims(), v.dims())?;
        match q.dtype() {
            DType::F32 => self.grads::<f32>(d, (q, k, v), grad),
            DType::F64 => self.grads::<f64>(d, (q, k, v), grad),
            dt => bail!("{}: f32 or f64 expected, got {dt:?}", self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ops;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Var {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let t = Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor");
        Var::from_tensor(&t).expect("var")
    }

    fn vec(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .expect("vec")
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len(), "lengths differ");
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    /// The fused op and the composition agree on the output and on the gradient of every
    /// input under a random upstream gradient, in F64 (to rounding) and F32.
    fn check(
        inputs: &[Var],
        fused: impl Fn(&[&Tensor]) -> Tensor,
        composed: impl Fn(&[&Tensor]) -> Tensor,
        tol: f64,
    ) {
        let ts: Vec<&Tensor> = inputs.iter().map(|v| v.as_tensor()).collect();
        let (yf, yc) = (fused(&ts), composed(&ts));
        assert_eq!(yf.dims(), yc.dims());
        let d = max_diff(&vec(&yf), &vec(&yc));
        assert!(d < tol, "outputs differ by {d}");
        let up = random(yf.dims(), 99, yf.dtype());
        let gf = (yf * up.as_tensor())
            .and_then(|t| t.sum_all())
            .and_then(|l| l.backward())
            .expect("fused backward");
        let gc = (yc * up.as_tensor())
            .and_then(|t| t.sum_all())
            .and_then(|l| l.backward())
            .expect("composed backward");
        for (i, v) in inputs.iter().enumerate() {
            let (a, b) = (gf.get(v.as_tensor()), gc.get(v.as_tensor()));
            let (a, b) = (a.expect("fused grad"), b.expect("composed grad"));
            let d = max_diff(&vec(a), &vec(b));
            assert!(d < tol, "gradient of input {i} differs by {d}");
        }
    }

    fn each_dtype(f: impl Fn(DType, f64)) {
        f(DType::F64, 1e-10);
        f(DType::F32, 1e-4);
    }

    #[test]
    fn rms_norm_matches_composition() {
        each_dtype(|dt, tol| {
            let x = random(&[3, 5, 16], 1, dt);
            let w = random(&[16], 2, dt);
            check(
                &[x],
                |t| {
                    t[0].apply_op2(w.as_tensor(), RmsNorm { eps: 1e-5 })
                        .expect("fused")
                },
                |t| ops::rms_norm(t[0], w.as_tensor(), 1e-5).expect("composed"),
                tol,
            );
        });
    }

    #[test]
    fn swiglu_matches_composition() {
        for ggml in [false, true] {
            each_dtype(|dt, tol| {
                let a = random(&[7, 24], 3, dt);
                let b = random(&[7, 24], 4, dt);
                check(
                    &[a, b],
                    |t| t[0].apply_op2(t[1], SwiGlu { ggml }).expect("fused"),
                    |t| (ops::silu(t[0]).expect("silu") * t[1]).expect("mul"),
                    tol,
                );
            });
        }
    }

    #[test]
    fn log_softmax_gather_matches_composition() {
        each_dtype(|dt, tol| {
            let targets = vec![0u32, 7, 3, 9, 9, 1];
            let x = random(&[6, 10], 7, dt);
            let ids = Tensor::new(targets.as_slice(), &Device::Cpu).expect("ids");
            check(
                &[x],
                |t| {
                    t[0].apply_op1(LogSoftmaxGather::new(targets.clone()))
                        .expect("fused")
                },
                |t| {
                    ops::log_softmax_last_dim(t[0])
                        .and_then(|l| l.gather(&ids.unsqueeze(D::Minus1)?, D::Minus1))
                        .and_then(|l| l.squeeze(D::Minus1))
                        .expect("composed")
                },
                tol,
            );
        });
    }

    #[test]
    fn lora_delta_matches_composition() {
        each_dtype(|dt, tol| {
            let x = random(&[5, 12], 10, dt);
            let a = random(&[3, 12], 11, dt);
            let b = random(&[7, 3], 12, dt);
            check(
                &[x, a, b],
                |t| {
                    t[0].apply_op3(t[1], t[2], LoraDelta { scale: 0.5 })
                        .expect("fused")
                },
                |t| {
                    let composed = || -> Result<Tensor> {
                        t[0].matmul(&t[1].t()?)?
                            .matmul(&t[2].t()?)?
                            .affine(0.5, 0.0)
                    };
                    composed().expect("composed")
                },
                tol,
            );
        });
    }

    #[test]
    fn attention_matches_composition() {
        each_dtype(|dt, tol| {
            for past in [0, 4] {
                let (b, heads, kv_heads, len, hd) = (2, 6, 2, 5, 8);
                let keys = past + len;
                let q = random(&[b, heads, len, hd], 13, dt);
                let k = random(&[b, kv_heads, keys, hd], 14, dt);
                let v = random(&[b, kv_heads, keys, hd], 15, dt);
                let scale = 1.0 / (hd as f64).sqrt();
                let mask = ops::causal_mask(len, past, dt, &Device::Cpu).expect("mask");
                check(
                    &[q, k, v],
                    |t| {
                        t[0].apply_op3(
                            t[1],
                            t[2],
                            Attention {
                                scale,
                                past,
                                f16_weights: false,
                            },
                        )
                        .expect("fused")
                    },
                    |t| {
                        let composed = || -> Result<Tensor> {
                            let group = heads / kv_heads;
                            let kr = ops::repeat_kv(t[1], group)?;
                            let vr = ops::repeat_kv(t[2], group)?;
                            let s = t[0]
                                .matmul(&kr.transpose(2, 3)?.contiguous()?)?
                                .affine(scale, 0.0)?
                                .broadcast_add(&mask)?;
                            ops::softmax_last_dim(&s)?
                                .matmul(&vr)?
                                .transpose(1, 2)?
                                .reshape((b * len, heads * hd))
                        };
                        composed().expect("composed")
                    },
                    tol,
                );
            }
        });
    }

    #[test]
    fn heads_match_reshape_transpose_and_rope() {
        each_dtype(|dt, tol| {
            let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10f32.powf(i as f32 / 4.0)).collect();
            let (b, len, heads, hd, start) = (2, 5, 3, 8, 2);
            let x = random(&[b * len, heads * hd], 16, dt);
            let tables = ops::RopeTables::new(&inv, start, len, dt, &Device::Cpu).expect("tables");
            for rotate in [false, true] {
                let op = Heads {
                    b,
                    len,
                    heads,
                    hd,
                    rope: rotate.then(|| Rope::new(&inv, start, len)),
                    f16: false,
                };
                check(
                    std::slice::from_ref(&x),
                    |t| t[0].apply_op1(op.clone()).expect("fused"),
                    |t| {
                        let h = t[0]
                            .reshape((b, len, heads, hd))
                            .and_then(|h| h.transpose(1, 2))
                            .and_then(|h| h.contiguous())
                            .expect("heads");
                        if rotate {
                            ops::rope(&h, &tables).expect("rope")
                        } else {
                            h
                        }
                    },
                    tol,
                );
            }
        });
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = random(&[2, 4], 8, DType::F32);
        let op = LogSoftmaxGather::new(vec![1, 9]);
        assert!(
            x.as_tensor().apply_op1(op).is_err(),
            "target outside the vocabulary"
        );
        let op = LogSoftmaxGather::new(vec![1]);
        assert!(
            x.as_tensor().apply_op1(op).is_err(),
            "one target for two rows"
        );
        let q = random(&[1, 2, 3, 4], 10, DType::F32);
        let t = q.as_tensor();
        let op = Attention {
            scale: 1.0,
            past: 1,
            f16_weights: false,
        };
        assert!(t.apply_op3(t, t, op).is_err(), "keys != past + len");
        let w = random(&[3], 9, DType::F32);
        assert!(x
            .as_tensor()
            .apply_op2(w.as_tensor(), RmsNorm { eps: 1e-5 })
            .is_err());
        let op = Heads {
            b: 1,
            len: 1,
            heads: 1,
            hd: 2,
            rope: Some(Rope::new(&[1.0], 0, 1)),
            f16: false,
        };
        let wrong = random(&[1, 4], 11, DType::F32);
        assert!(
            wrong.as_tensor().apply_op1(op.clone()).is_err(),
            "rows of the wrong width"
        );
        let ints = Tensor::new(&[[1u32, 2]], &Device::Cpu).expect("ints");
        assert!(ints.apply_op1(op).is_err(), "integer input");
    }
}
