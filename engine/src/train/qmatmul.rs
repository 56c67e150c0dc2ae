//! A base projection that keeps its weight quantized on the training path.
//!
//! candle's `QMatMul` has no backward, and dequantising a whole base model to f32 multiplies
//! its memory by up to eight. [`QMatMulOp`] runs the forward with the serving kernel
//! (`QMatrix::matmul`, so the arithmetic is the serving arithmetic) and the backward as
//! `grad_x = grad_y · W`, split by `grad_x`'s columns over the compute pool: each task
//! dequantises its columns of `W` a block of rows at a time into a reused buffer and
//! accumulates each block's product with the gemm crate candle uses (reading the gradient's
//! columns in place, no copies). The weight itself never receives gradient: it is not a
//! variable of the graph. CPU only (the forward reads host memory); on CUDA use the dense f32
//! base.

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, Error, Layout, Result, Shape, Storage, Tensor,
};

use super::fused::{
    check_targets, column_windows, for_rows_mut, log_softmax_grad_row, log_sum_exp, map_rows,
    LoraDelta,
};
use crate::quant::{num_threads, runs_inline, with_buffer, QMatrix};

/// f32 elements of `W` dequantised at once in the backward (4 MiB).
const BACKWARD_BLOCK_ELEMS: usize = 1 << 20;

thread_local! {
    /// The backward's dequantised block of `W`, kept between calls (no allocation per call).
    static DEQUANTIZED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The forward's LoRA delta, kept between calls.
    static DELTA: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y = x Wᵀ` for `x` `[.., in]` with `W` a quantized `[out, in]` matrix (or a range of its
/// rows), differentiable in `x`.
#[derive(Debug, Clone)]
pub struct QMatMulOp {
    weight: QMatrix,
    rows: std::ops::Range<usize>,
}

impl QMatMulOp {
    /// Wraps a weight matrix (shared, not copied: the bytes are reference-counted).
    pub fn new(weight: QMatrix) -> Self {
        let rows = 0..weight.rows();
        QMatMulOp { weight, rows }
    }

    /// The product with rows `first .. first + n` of `weight` only: one part of a fused
    /// matrix (q, k or v of a fused q/k/v) without computing the others or splitting after.
    pub fn rows(weight: QMatrix, first: usize, n: usize) -> Result<Self> {
        match first.checked_add(n) {
            Some(end) if end <= weight.rows() => Ok(QMatMulOp {
                weight,
                rows: first..end,
            }),
            _ => bail!(
                "qmatmul: rows {first}+{n} of a {}-row matrix",
                weight.rows()
            ),
        }
    }

    /// The wrapped weight.
    pub fn weight(&self) -> &QMatrix {
        &self.weight
    }

    /// `g · W` for the row-major output gradient `g` `[m, rows]`: `[m, cols]`, split by
    /// column over the compute pool. Each task dequantises only its columns of `W` (whole
    /// quantization blocks), a block of rows at a time, into its own reused buffer, so the
    /// dequantisation runs in parallel and its output is used while hot; the gradient's
    /// columns are read in place.
    fn grad_input(&self, g: &[f32], m: usize) -> Result<Vec<f32>> {
        let (rows, cols) = (self.rows.len(), self.weight.cols());
        if g.len() != m * rows {
            bail!(
                "qmatmul backward: {} gradient values for {m} x {rows}",
                g.len()
            );
        }
        let mut grad_x = vec![0f32; m * cols];
        let bs = self.weight.dtype().block_size();
        let blocks = cols / bs.max(1);
        // One window per thread of the pool; one window where the pool's tasks would run on
        // this thread anyway (the gradient's rows are then packed once, not per window).
        let threads = if runs_inline() { 1 } else { num_threads() };
        let tasks = threads.min(blocks).max(1);
        let bounds: Vec<usize> = (0..=tasks).map(|t| blocks * t / tasks * bs).collect();
        let failed = std::sync::Mutex::new(None);
        column_windows(&mut grad_x, (m, cols), &bounds, &|_, mut window| {
            let c = window.cols();
            let width = c.len();
            let block = (BACKWARD_BLOCK_ELEMS / tasks / width.max(1)).max(1);
            with_buffer(&DEQUANTIZED, block.min(rows) * width, |w| {
                for r0 in (0..rows).step_by(block) {
                    let n = block.min(rows - r0);
                    let w = &mut w[..n * width];
                    if let Err(e) = self
                        .weight
                        .dequantize_block(self.rows.start + r0, c.clone(), w)
                    {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return;
                    }
                    // grad_x[:, c] (+)= g[:, r0..r0 + n] · W[r0..r0 + n, c].
                    window.gemm(
                        n,
                        r0 > 0,
                        (&g[r0..], 1, rows as isize),
                        (w, 1, width as isize),
                    );
                }
            })
        });
        match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(Error::wrap(e)),
            None => Ok(grad_x),
        }
    }

    /// `x Wᵀ` for `m` row-major rows `x`: `[m, rows]`, with the serving kernel.
    fn product(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; m * self.rows.len()];
        self.weight
            .matmul_rows(self.rows.clone(), x, m, &mut out)
            .map_err(Error::wrap)?;
        Ok(out)
    }

    fn out_shape(&self, dims: &[usize]) -> Result<(usize, Shape)> {
        let cols = self.weight.cols();
        match dims.split_last() {
            Some((&last, lead)) if last == cols => {
                let mut out = lead.to_vec();
                out.push(self.rows.len());
                Ok((lead.iter().product(), Shape::from(out)))
            }
            _ => bail!(
                "qmatmul: input of shape {dims:?} does not end in the weight's {cols} columns"
            ),
        }
    }
}

impl CustomOp1 for QMatMulOp {
    fn name(&self) -> &'static str {
        "qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, shape) = self.out_shape(layout.dims())?;
        let out = self.product(f32_slice(storage, layout, self.name())?, m)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        let m = g.elem_count() / self.rows.len().max(1);
        if m * self.weight.cols() != arg.elem_count() {
            bail!("qmatmul backward: gradient of shape {:?}", g.dims());
        }
        let grad_x = with_f32(&g, "qmatmul backward", |g| self.grad_input(g, m))?;
        Ok(Some(Tensor::from_vec(grad_x, arg.shape(), arg.device())?))
    }
}

/// The values of a contiguous f32 CPU storage, borrowed in place.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets()) else {
        bail!("{what}: a contiguous f32 input expected")
    };
    Ok(&data[start..end])
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, borrowed in place.
fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else {
        bail!("{what}: a CPU tensor expected")
    };
    f(f32_slice(storage, layout, what)?)
}

/// A quantized base projection and its LoRA pair as one op: `y = x Wᵀ + scale · (x Aᵀ) Bᵀ`
/// for `x` `[rows, in]`, `A` `[r, in]`, `B` `[out, r]`. The same numbers as [`QMatMulOp`]
/// plus [`LoraDelta`] added after, but one node instead of three: the sum is made in place,
/// and the backward writes `x`'s gradient once (the base's part, then the LoRA's added into
/// it) instead of zeroing and adding a buffer per branch.
#[derive(Debug, Clone)]
pub struct QLoraLinear {
    base: QMatMulOp,
    lora: LoraDelta,
}

impl QLoraLinear {
    /// The base projection `base` with a LoRA pair of scale `scale`.
    pub fn new(base: QMatMulOp, scale: f64) -> Self {
        QLoraLinear {
            base,
            lora: LoraDelta { scale },
        }
    }

    fn dims(&self, x: &[usize], a: &[usize], b: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let dims = self.lora.dims(x, a, b)?;
        let (_, i, _, o) = dims;
        if i != self.base.weight.cols() || o != self.base.rows.len() {
            bail!(
                "lora linear: a {o} x {i} LoRA on a {} x {} projection",
                self.base.rows.len(),
                self.base.weight.cols()
            );
        }
        Ok(dims)
    }
}

impl CustomOp3 for QLoraLinear {
    fn name(&self) -> &'static str {
        "qmatmul-lora"
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
        let (m, _, _, o) = dims;
        let what = self.name();
        let x = f32_slice(xs, xl, what)?;
        let (a, b) = (f32_slice(as_, al, what)?, f32_slice(bs, bl, what)?);
        let mut out = self.base.product(x, m)?;
        // The delta is rounded on its own and then added, as the serving forward adds it: the
        // 8-bit activations downstream turn any other rounding into different numbers.
        with_buffer(&DELTA, out.len(), |delta| {
            self.lora.values_into((x, a, b), dims, delta);
            for (y, d) in out.iter_mut().zip(delta.iter()) {
                *y += d;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((m, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(x.dims(), a.dims(), b.dims())?;
        let (m, i, r, o) = dims;
        let (x, a, b, g) = (
            x.contiguous()?,
            a.contiguous()?,
            b.contiguous()?,
            grad.contiguous()?,
        );
        let what = self.name();
        let (gx, ga, gb) = with_f32(&g, what, |g| {
            let mut gx = self.base.grad_input(g, m)?;
            let (ga, gb) = with_f32(&x, what, |x| {
                with_f32(&a, what, |a| {
                    with_f32(&b, what, |b| {
                        Ok(self.lora.grads_into((x, a, b, g), dims, (&mut gx, true)))
                    })
                })
            })?;
            Ok((gx, ga, gb))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(gx, (m, i), dev)?),
            Some(Tensor::from_vec(ga, (r, i), dev)?),
            Some(Tensor::from_vec(gb, (o, r), dev)?),
        ))
    }
}

/// The quantized LM head and the log-softmax gather as one op: hidden states `[rows, hidden]`
/// → `log_softmax(h Wᵀ)[r, targets[r]]` `[rows]`. The same numbers as [`QMatMulOp`] followed
/// by [`LogSoftmaxGather`](super::fused::LogSoftmaxGather), but the `[rows, vocab]` logits stay
/// inside the op (kept from the forward for the backward, which turns them into their
/// gradient in place and multiplies by `W`): no logits tensor in the graph, so no zeroed
/// `[rows, vocab]` gradient buffer and no add into it.
#[derive(Debug)]
pub struct HeadLogSoftmax {
    head: QMatMulOp,
    targets: Vec<u32>,
    /// The forward's logits, taken by the backward.
    logits: Mutex<Option<Vec<f32>>>,
}

impl HeadLogSoftmax {
    /// The head `head` scoring one target id per row.
    pub fn new(head: QMatMulOp, targets: Vec<u32>) -> Self {
        HeadLogSoftmax {
            head,
            targets,
            logits: Mutex::new(None),
        }
    }

    /// `(rows, vocab)` for an input of `dims`, checked against the targets.
    fn check(&self, dims: &[usize]) -> Result<(usize, usize)> {
        let (rows, _) = self.head.out_shape(dims)?;
        let vocab = self.head.rows.len();
        check_targets(&self.targets, (rows, vocab), self.name())?;
        Ok((rows, vocab))
    }
}

impl CustomOp1 for HeadLogSoftmax {
    fn name(&self) -> &'static str {
        "qmatmul-head-log-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = self.check(layout.dims())?;
        let logits = self
            .head
            .product(f32_slice(storage, layout, self.name())?, rows)?;
        let out = map_rows(rows, 1, vocab, |r, dst: &mut [f32]| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            dst[0] = row[self.targets[r] as usize] - log_sum_exp(row);
        });
        *self.logits.lock().unwrap_or_else(|p| p.into_inner()) = Some(logits);
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = self.check(arg.dims())?;
        let arg = arg.contiguous()?;
        let kept = self.logits.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut logits = match kept {
            Some(l) => l,
            // A second backward through the same graph: compute them again.
            None => with_f32(&arg, self.name(), |x| self.head.product(x, rows))?,
        };
        let g = grad.contiguous()?.to_vec1::<f32>()?;
        if g.len() != rows {
            bail!("{}: {} gradients for {rows} rows", self.name(), g.len());
        }
        for_rows_mut(&mut logits, vocab, vocab, |r, row: &mut [f32]| {
            if g[r] == 0.0 {
                row.fill(0.0); // masked position
            } else {
                log_softmax_grad_row(row, self.targets[r] as usize, g[r]);
            }
        });
        let grad_x = self.head.grad_input(&logits, rows)?;
        Ok(Some(Tensor::from_vec(grad_x, arg.shape(), arg.device())?))
    }
}
