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
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use num_traits::{Float, One, Zero};

use crate::quant::parallel_for;

/// Elements per task when rows are spread over the compute pool (smaller work stays on one
/// thread: waking the pool costs more than it saves).
const TASK_ELEMS: usize = 1 << 14;

/// A float element the fused ops compute in.
trait Elem: WithDType + Float {}
impl Elem for f32 {}
impl Elem for f64 {}

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
fn map_rows<T: Elem>(
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

/// `silu(gate) · up` with `silu(a) = a / (1 + e⁻ᵃ)` (the serving forward's SwiGLU).
#[derive(Debug, Clone, Copy)]
pub struct SwiGlu;

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
                let (ar, br) = (&a[r * n..(r + 1) * n], &b[r * n..(r + 1) * n]);
                for ((d, &av), &bv) in dst.iter_mut().zip(ar).zip(br) {
                    *d = av / (T::one() + (-av).exp()) * bv;
                }
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

/// Causal softmax of attention scores `[.., len, keys]` (`keys = past + len`): query `i` sees
/// keys `0..=past + i`, scaled by `scale` before the softmax; hidden keys get probability 0.
#[derive(Debug, Clone, Copy)]
pub struct CausalSoftmax {
    /// Multiplies the raw scores (`1/√head_dim`).
    pub scale: f64,
    /// Keys before the first query (prefix and prompt), visible to every query.
    pub past: usize,
}

impl CausalSoftmax {
    fn geometry(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let dims = layout.dims();
        if dims.len() < 2 {
            bail!("causal softmax: scores of shape {dims:?}");
        }
        let (len, keys) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if keys != self.past + len {
            bail!(
                "causal softmax: {keys} keys for {len} queries after {} past",
                self.past
            );
        }
        Ok((layout.shape().elem_count() / keys.max(1), len, keys))
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, len, keys) = self.geometry(layout)?;
        with_float!(storage, self.name(), |T| {
            let s = slice::<T>(storage, layout, self.name())?;
            let scale: T = cast(self.scale);
            let out = map_rows(rows, keys, keys, |r, dst: &mut [T]| {
                let visible = self.past + r % len + 1;
                let src = &s[r * keys..r * keys + visible];
                let max = src
                    .iter()
                    .fold(T::neg_infinity(), |m, &v| Float::max(m, v * scale));
                let mut sum = T::zero();
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = (v * scale - max).exp();
                    sum += *d;
                }
                for d in &mut dst[..visible] {
                    *d /= sum;
                }
            });
            Ok((T::to_cpu_storage_owned(out), layout.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward(self.scale))?;
        Ok(Some(g))
    }
}

/// `∂/∂scores` of a scaled softmax from its output `p`: `scale · p · (g − Σ p·g)` per row.
struct SoftmaxBackward(f64);

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, n) = rows_of(pl, self.name())?;
        with_float!(ps, self.name(), |T| {
            let p = slice::<T>(ps, pl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            if g.len() != p.len() {
                bail!("{}: mismatched shapes", self.name());
            }
            let scale: T = cast(self.0);
            let out = map_rows(rows, n, n, |r, dst: &mut [T]| {
                let (pr, gr) = (&p[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
                let dot = pr
                    .iter()
                    .zip(gr)
                    .fold(T::zero(), |a, (&pv, &gv)| a + pv * gv);
                for ((d, &pv), &gv) in dst.iter_mut().zip(pr).zip(gr) {
                    *d = scale * pv * (gv - dot);
                }
            });
            Ok((T::to_cpu_storage_owned(out), pl.shape().clone()))
        })
    }
}

/// Rotate-half rotary embedding of `x` `[.., len, head_dim]` for positions
/// `start .. start + len`: `(x₁, x₂) ↦ (x₁ cos − x₂ sin, x₂ cos + x₁ sin)`, with angles formed
/// in f64 and rounded once to the compute type, as the serving table is.
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

    /// The inverse rotation (the backward of this one).
    fn inverse(&self) -> Self {
        Rope {
            sin: self.sin.iter().map(|s| -s).collect(),
            ..self.clone()
        }
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, hd) = rows_of(layout, self.name())?;
        let dims = layout.dims();
        if hd != 2 * self.half || dims.len() < 2 || dims[dims.len() - 2] != self.len {
            bail!(
                "{}: input {dims:?} for {} positions of head_dim {}",
                self.name(),
                self.len,
                2 * self.half
            );
        }
        let h = self.half;
        with_float!(storage, self.name(), |T| {
            let x = slice::<T>(storage, layout, self.name())?;
            let cos: Vec<T> = self.cos.iter().map(|&v| cast(v)).collect();
            let sin: Vec<T> = self.sin.iter().map(|&v| cast(v)).collect();
            let out = map_rows(rows, hd, hd, |r, dst: &mut [T]| {
                let p = r % self.len;
                let (c, s) = (&cos[p * h..(p + 1) * h], &sin[p * h..(p + 1) * h]);
                let src = &x[r * hd..(r + 1) * hd];
                let (x1, x2) = src.split_at(h);
                let (lo, hi) = dst.split_at_mut(h);
                for i in 0..h {
                    lo[i] = x1[i] * c[i] - x2[i] * s[i];
                    hi[i] = x2[i] * c[i] + x1[i] * s[i];
                }
            });
            Ok((T::to_cpu_storage_owned(out), layout.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&self.inverse())?))
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
        if rows != self.targets.len() {
            bail!("{what}: {rows} rows for {} targets", self.targets.len());
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            bail!("{what}: target {t} outside a vocabulary of {vocab}");
        }
        Ok((rows, vocab))
    }
}

/// `max + ln Σ exp(x − max)` of one row.
fn log_sum_exp<T: Elem>(row: &[T]) -> T {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
    let sum = row.iter().fold(T::zero(), |a, &v| a + (v - max).exp());
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
                let row = &x[r * vocab..(r + 1) * vocab];
                let lse = log_sum_exp(row);
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = -gr * (v - lse).exp();
                }
                dst[self.0.targets[r] as usize] += gr;
            });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::ops;
    use candle_core::{DType, Device, Var, D};
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
        each_dtype(|dt, tol| {
            let a = random(&[7, 24], 3, dt);
            let b = random(&[7, 24], 4, dt);
            check(
                &[a, b],
                |t| t[0].apply_op2(t[1], SwiGlu).expect("fused"),
                |t| (ops::silu(t[0]).expect("silu") * t[1]).expect("mul"),
                tol,
            );
        });
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        each_dtype(|dt, tol| {
            for past in [0, 3] {
                let (len, scale) = (5, 0.25);
                let s = random(&[2, 3, len, past + len], 5, dt);
                let mask = ops::causal_mask(len, past, dt, &Device::Cpu).expect("mask");
                check(
                    &[s],
                    |t| {
                        t[0].apply_op1(CausalSoftmax { scale, past })
                            .expect("fused")
                    },
                    |t| {
                        let x = t[0]
                            .affine(scale, 0.0)
                            .and_then(|x| x.broadcast_add(&mask))
                            .expect("scores");
                        ops::softmax_last_dim(&x).expect("softmax")
                    },
                    tol,
                );
            }
        });
    }

    #[test]
    fn rope_matches_composition() {
        each_dtype(|dt, tol| {
            let inv: Vec<f32> = (0..4).map(|i| 1.0 / 10f32.powf(i as f32 / 4.0)).collect();
            let (start, len) = (3, 6);
            let x = random(&[2, 3, len, 8], 6, dt);
            let tables = ops::RopeTables::new(&inv, start, len, dt, &Device::Cpu).expect("tables");
            check(
                &[x],
                |t| t[0].apply_op1(Rope::new(&inv, start, len)).expect("fused"),
                |t| ops::rope(t[0], &tables).expect("composed"),
                tol,
            );
        });
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
        let op = CausalSoftmax {
            scale: 1.0,
            past: 1,
        };
        assert!(x.as_tensor().apply_op1(op).is_err(), "keys != past + len");
        let w = random(&[3], 9, DType::F32);
        assert!(x
            .as_tensor()
            .apply_op2(w.as_tensor(), RmsNorm { eps: 1e-5 })
            .is_err());
        let i = Tensor::new(&[1u32, 2], &Device::Cpu).expect("ints");
        assert!(
            i.apply_op1(Rope::new(&[1.0], 0, 1)).is_err(),
            "integer input"
        );
    }
}
