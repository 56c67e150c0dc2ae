//! Quantized GGUF weight formats and fast CPU kernels.
//!
//! * [`GgmlDType`]: the ggml block formats (sizes, ids, names) — `dtype.rs`.
//! * [`dequantize`] / [`quantize`]: reference converters — `dequant.rs`, `quantize.rs`.
//! * [`QMatrix`]: a weight matrix in ggml blocks with a ggml-exact matmul — `matrix.rs`.
//! * `kernels/`: per-format vec-dot kernels (scalar oracle; AVX2, then AVX512-VNNI or AVX-VNNI
//!   for the int8 formats, chosen at runtime) and 4x4 micro-kernels for batched rows.
//! * [`parallel_for`] and the global compute pool — `pool.rs`.

mod dequant;
mod dtype;
mod kernels;
mod matrix;
mod pool;
mod quantize;

#[cfg(test)]
mod tests;

pub use dequant::dequantize;
pub(crate) use matrix::with_buffer;
pub use matrix::{Activations, QMatrix};
pub use pool::{
    background_thread, is_background_thread, lower_thread_priority, num_threads, parallel_for,
    runs_inline, serial, set_num_threads,
};
pub(crate) use quantize::f16_round;
#[cfg(test)]
pub(crate) use quantize::q8_block;
pub use quantize::quantize;
pub(crate) use quantize::{q8_amax, q8_round};

/// A ggml tensor element format (float or block-quantized).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlDType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16.
    BF16,
    /// 32 x 4-bit, one f16 scale, zero point 8.
    Q4_0,
    /// 32 x 4-bit, f16 scale and f16 minimum.
    Q4_1,
    /// 32 x 5-bit, one f16 scale, zero point 16.
    Q5_0,
    /// 32 x 5-bit, f16 scale and f16 minimum.
    Q5_1,
    /// 32 x int8, one f16 scale.
    Q8_0,
    /// 32 x int8, f16 scale and f16 `scale * sum(q)` (activation format of Q4_1/Q5_1).
    Q8_1,
    /// 256-element super-block, 2-bit.
    Q2K,
    /// 256-element super-block, 3-bit.
    Q3K,
    /// 256-element super-block, 4-bit with 6-bit sub-scales and mins.
    Q4K,
    /// 256-element super-block, 5-bit with 6-bit sub-scales and mins.
    Q5K,
    /// 256-element super-block, 6-bit with int8 sub-scales.
    Q6K,
    /// 256 x int8 with f32 scale and 16-element sums (activation format of the K-quants).
    Q8K,
}

/// Errors of the quantization module; all data-dependent failures are reported here.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The operation is not implemented for this format.
    #[error("unsupported ggml type {dtype:?} for {op}")]
    UnsupportedType {
        /// The offending type.
        dtype: GgmlDType,
        /// The operation that was asked for.
        op: &'static str,
    },
    /// A ggml type id that this crate does not know.
    #[error("unknown ggml type id {0}")]
    UnknownTypeId(u32),
    /// A shape that the format cannot hold (e.g. cols not a multiple of the block size).
    #[error("bad shape for {dtype:?}: {rows}x{cols} ({reason})")]
    BadShape {
        /// The weight format.
        dtype: GgmlDType,
        /// Rows requested.
        rows: usize,
        /// Columns requested.
        cols: usize,
        /// Why the shape is rejected.
        reason: &'static str,
    },
    /// A buffer has the wrong length.
    #[error("size mismatch in {what}: expected {expected}, got {actual}")]
    SizeMismatch {
        /// Which buffer.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        actual: usize,
    },
    /// A row index past the end.
    #[error("row {row} out of range (rows = {rows})")]
    RowOutOfRange {
        /// Requested row.
        row: usize,
        /// Number of rows.
        rows: usize,
    },
}

/// Raw bytes of a weight: owned, or a range of a memory-mapped file (zero copy).
#[derive(Clone)]
pub enum WeightBytes {
    /// Bytes owned in memory.
    Owned(std::sync::Arc<[u8]>),
    /// A byte range `offset..offset + len` of a memory map.
    Mapped {
        /// The shared map.
        map: std::sync::Arc<memmap2::Mmap>,
        /// Start of the range in the map.
        offset: usize,
        /// Length of the range.
        len: usize,
    },
}

impl WeightBytes {
    /// A mapped range, checked against the map's length.
    pub fn mapped(
        map: std::sync::Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    ) -> Result<Self, QuantError> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= map.len() => Ok(WeightBytes::Mapped { map, offset, len }),
            _ => Err(QuantError::SizeMismatch {
                what: "mapped weight range",
                expected: map.len(),
                actual: end.unwrap_or(usize::MAX),
            }),
        }
    }
}

impl std::fmt::Debug for WeightBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightBytes::Owned(b) => write!(f, "WeightBytes::Owned({} bytes)", b.len()),
            WeightBytes::Mapped { offset, len, .. } => {
                write!(f, "WeightBytes::Mapped({len} bytes at {offset})")
            }
        }
    }
}

impl From<Vec<u8>> for WeightBytes {
    fn from(v: Vec<u8>) -> Self {
        WeightBytes::Owned(v.into())
    }
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            WeightBytes::Owned(b) => b,
            // An out-of-range Mapped (only constructible by hand, bypassing `mapped`) yields an
            // empty slice, which QMatrix::new then rejects with a SizeMismatch instead of panicking.
            WeightBytes::Mapped { map, offset, len } => offset
                .checked_add(*len)
                .and_then(|end| map.get(*offset..end))
                .unwrap_or(&[]),
        }
    }
}
