//! A base projection that keeps its weight quantized on the training path.
//!
//! candle's `QMatMul` has no backward, and dequantising a whole base model to f32 multiplies
//! its memory by up to eight. [`QMatMulOp`] runs the forward with the serving kernel
//! (`QMatrix::matmul`, so the arithmetic is the serving arithmetic) and the backward as
//! `grad_x = grad_y · W`, dequantising `W` a block of rows at a time. The weight itself never
//! receives gradient: it is not a variable of the graph. CPU only (the forward reads host
//! memory); on CUDA use the dense f32 base.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Error, Layout, Result, Shape, Tensor};

use crate::quant::QMatrix;

/// f32 elements of `W` dequantised at once in the backward (4 MiB).
const BACKWARD_BLOCK_ELEMS: usize = 1 << 20;

/// `y = x Wᵀ` for `x` `[.., in]` with `W` a quantized `[out, in]` matrix, differentiable in `x`.
#[derive(Debug, Clone)]
pub struct QMatMulOp {
    weight: QMatrix,
}

impl QMatMulOp {
    /// Wraps a weight matrix (shared, not copied: the bytes are reference-counted).
    pub fn new(weight: QMatrix) -> Self {
        QMatMulOp { weight }
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
                out.push(self.weight.rows());
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
        let mut out = vec![0f32; m * self.weight.rows()];
        self.weight
            .matmul(&data[start..end], m, &mut out)
            .map_err(Error::wrap)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (rows, cols) = (self.weight.rows(), self.weight.cols());
        let m = arg.elem_count() / cols.max(1);
        let g = grad_res.reshape((m, rows))?;
        let block = (BACKWARD_BLOCK_ELEMS / cols.max(1)).max(1);
        let mut grad_x = Tensor::zeros((m, cols), grad_res.dtype(), grad_res.device())?;
        let mut buf = Vec::new();
        for r0 in (0..rows).step_by(block) {
            let n = block.min(rows - r0);
            buf.resize(n * cols, 0f32);
            for (i, dst) in buf.chunks_exact_mut(cols).enumerate() {
                self.weight
                    .dequantize_row(r0 + i, dst)
                    .map_err(Error::wrap)?;
            }
            let w = Tensor::from_slice(&buf, (n, cols), grad_res.device())?
                .to_dtype(grad_res.dtype())?;
            let g_blk = g.narrow(1, r0, n)?.contiguous()?;
            grad_x = (grad_x + g_blk.matmul(&w)?)?;
        }
        Ok(Some(grad_x.reshape(arg.shape())?))
    }
}
