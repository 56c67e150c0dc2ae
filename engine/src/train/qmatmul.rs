//! A base projection that keeps its weight quantized on the training path.
//!
//! candle's `QMatMul` has no backward, and dequantising a whole base model to f32 multiplies
//! its memory by up to eight. [`QMatMulOp`] runs the forward with the serving kernel
//! (`QMatrix::matmul`, so the arithmetic is the serving arithmetic) and the backward as
//! `grad_x = grad_y · W`, dequantising `W` a block of rows at a time into a reused buffer and
//! accumulating each block's product into one output with the gemm crate candle uses, rows
//! split over the compute pool (reading the gradient's columns in place, no copies). The
//! weight itself never
//! receives gradient: it is not a variable of the graph. CPU only (the forward reads host
//! memory); on CUDA use the dense f32 base.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Error, Layout, Result, Shape, Storage, Tensor};

use super::fused::gemm_into;
use crate::quant::{with_buffer, QMatrix};

/// f32 elements of `W` dequantised at once in the backward (4 MiB).
const BACKWARD_BLOCK_ELEMS: usize = 1 << 20;

thread_local! {
    /// The backward's dequantised block of `W`, kept between calls (no allocation per call).
    static DEQUANTIZED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
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
        let CpuStorage::F32(data) = storage else {
            bail!("qmatmul: input must be f32, got {:?}", storage.dtype())
        };
        let (m, shape) = self.out_shape(layout.dims())?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("qmatmul: input must be contiguous")
        };
        let mut out = vec![0f32; m * self.rows.len()];
        self.weight
            .matmul_rows(self.rows.clone(), &data[start..end], m, &mut out)
            .map_err(Error::wrap)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, cols) = (self.rows.len(), self.weight.cols());
        let g = grad_res.contiguous()?;
        let m = g.elem_count() / rows.max(1);
        if m * cols != arg.elem_count() {
            bail!("qmatmul backward: gradient of shape {:?}", g.dims());
        }
        let mut grad_x = vec![0f32; m * cols];
        {
            let (storage, layout) = g.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                bail!("qmatmul backward: f32 CPU gradient expected")
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("qmatmul backward: gradient must be contiguous")
            };
            let g = &data[start..end];
            let block = (BACKWARD_BLOCK_ELEMS / cols.max(1)).max(1);
            with_buffer(&DEQUANTIZED, block.min(rows) * cols, |w| -> Result<()> {
                for r0 in (0..rows).step_by(block) {
                    let n = block.min(rows - r0);
                    let w = &mut w[..n * cols];
                    self.weight
                        .dequantize_rows(self.rows.start + r0, w)
                        .map_err(Error::wrap)?;
                    // grad_x[m, cols] += g[:, r0..r0 + n] · W[r0..r0 + n, :], reading the
                    // gradient's columns in place.
                    gemm_into(
                        (m, cols, n),
                        &mut grad_x,
                        r0 > 0,
                        (&g[r0..], 1, rows as isize),
                        (w, 1, cols as isize),
                        1.0,
                    );
                }
                Ok(())
            })?;
        }
        Ok(Some(Tensor::from_vec(grad_x, arg.shape(), arg.device())?))
    }
}
