//! Reference dequantization of every ggml format to f32.
//!
//! Blocks are read straight from little-endian bytes (no struct casts), so any alignment
//! of the source — e.g. an odd offset inside a memory-mapped GGUF — is fine.

use super::dtype::QK_K;
use super::{GgmlDType, QuantError};

/// Reads the little-endian f16 at `b[off..off + 2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Reads the little-endian f32 at `b[off..off + 4]`.
#[inline(always)]
pub(crate) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Unpacks the 6-bit (scale, min) pair `j` (0..8) of a Q4_K / Q5_K scales array.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Unpacks the sixteen 6-bit Q3_K scales (already minus 32).
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        // Low 4 bits: nibble j%8 of bytes 0..8; high 2 bits: 2-bit field j/4.. of bytes 8..12.
        let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let hi = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
        *o = ((lo | (hi << 4)) as i8).wrapping_sub(32);
    }
    out
}

/// Dequantizes `bytes` of format `dtype` into `out` (whose length is the element count), with
/// this CPU's SIMD dequantizer where it has one for `dtype` (bit-identical to the portable
/// reference code, which the other formats use).
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(dtype, bytes, out)?;
    match super::kernels::kernels().dequant(dtype) {
        Some(simd) => simd(bytes, out),
        None => dequantize_blocks(dtype, bytes, out),
    }
    Ok(())
}

/// [`dequantize`] with the portable reference code for every format (what the SIMD
/// dequantizers are tested against).
#[cfg(test)]
pub(crate) fn dequantize_reference(
    dtype: GgmlDType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), QuantError> {
    check_lengths(dtype, bytes, out)?;
    dequantize_blocks(dtype, bytes, out);
    Ok(())
}

/// Whether `bytes` are whole blocks of `dtype` holding exactly `out.len()` elements.
fn check_lengths(dtype: GgmlDType, bytes: &[u8], out: &[f32]) -> Result<(), QuantError> {
    let expected = dtype.row_bytes(out.len()).ok_or(QuantError::BadShape {
        dtype,
        rows: 1,
        cols: out.len(),
        reason: "element count is not a multiple of the block size",
    })?;
    if bytes.len() != expected {
        return Err(QuantError::SizeMismatch {
            what: "dequantize input",
            expected,
            actual: bytes.len(),
        });
    }
    Ok(())
}

/// The reference dequantization of whole blocks (lengths already checked).
fn dequantize_blocks(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    let ts = dtype.type_size();
    let bs = dtype.block_size();
    let blocks = bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match dtype {
        GgmlDType::F32 => blocks.for_each(|(b, y)| y[0] = f32_at(b, 0)),
        GgmlDType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlDType::BF16 => blocks.for_each(|(b, y)| {
            y[0] = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        GgmlDType::Q4_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for j in 0..16 {
                y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }),
        GgmlDType::Q4_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..16 {
                y[j] = (b[4 + j] & 0xF) as f32 * d + m;
                y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
            }
        }),
        GgmlDType::Q5_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = (((b[6 + j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((b[6 + j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }),
        GgmlDType::Q5_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = ((b[8 + j] & 0xF) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((b[8 + j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }),
        GgmlDType::Q8_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }),
        GgmlDType::Q8_1 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for j in 0..32 {
                y[j] = (b[4 + j] as i8) as f32 * d;
            }
        }),
        GgmlDType::Q8K => blocks.for_each(|(b, y)| {
            let d = f32_at(b, 0);
            for j in 0..QK_K {
                y[j] = (b[4 + j] as i8) as f32 * d;
            }
        }),
        GgmlDType::Q2K => blocks.for_each(|(b, y)| {
            // scales[16] | qs[64] | d | dmin
            let (sc, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            for half in 0..2 {
                let q = &qs[32 * half..32 * half + 32];
                for shift in 0..4 {
                    for g in 0..2 {
                        let s = sc[half * 8 + shift * 2 + g];
                        let (dl, ml) = (d * (s & 0xF) as f32, dmin * (s >> 4) as f32);
                        let base = 128 * half + 32 * shift + 16 * g;
                        for l in 0..16 {
                            let v = (q[16 * g + l] >> (2 * shift)) & 3;
                            y[base + l] = dl * v as f32 - ml;
                        }
                    }
                }
            }
        }),
        GgmlDType::Q3K => blocks.for_each(|(b, y)| {
            // hmask[32] | qs[64] | scales[12] | d
            let (hm, qs) = (&b[0..32], &b[32..96]);
            let scales = q3k_scales(&b[96..108]);
            let d = f16_at(b, 108);
            for half in 0..2 {
                let q = &qs[32 * half..32 * half + 32];
                for shift in 0..4 {
                    let bit = 1u8 << (4 * half + shift);
                    for g in 0..2 {
                        let dl = d * scales[half * 8 + shift * 2 + g] as f32;
                        let base = 128 * half + 32 * shift + 16 * g;
                        for l in 0..16 {
                            let i = 16 * g + l;
                            let lo = ((q[i] >> (2 * shift)) & 3) as i32;
                            let v = lo - if hm[i] & bit == 0 { 4 } else { 0 };
                            y[base + l] = dl * v as f32;
                        }
                    }
                }
            }
        }),
        GgmlDType::Q4K => blocks.for_each(|(b, y)| {
            // d | dmin | scales[12] | qs[128]
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, qs) = (&b[4..16], &b[16..144]);
            for j in 0..4 {
                let (s0, m0) = scale_min_k4(2 * j, sc);
                let (s1, m1) = scale_min_k4(2 * j + 1, sc);
                let (d0, mm0) = (d * s0 as f32, dmin * m0 as f32);
                let (d1, mm1) = (d * s1 as f32, dmin * m1 as f32);
                for l in 0..32 {
                    let q = qs[32 * j + l];
                    y[64 * j + l] = d0 * (q & 0xF) as f32 - mm0;
                    y[64 * j + 32 + l] = d1 * (q >> 4) as f32 - mm1;
                }
            }
        }),
        GgmlDType::Q5K => blocks.for_each(|(b, y)| {
            // d | dmin | scales[12] | qh[32] | qs[128]
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            for j in 0..4 {
                let (s0, m0) = scale_min_k4(2 * j, sc);
                let (s1, m1) = scale_min_k4(2 * j + 1, sc);
                let (d0, mm0) = (d * s0 as f32, dmin * m0 as f32);
                let (d1, mm1) = (d * s1 as f32, dmin * m1 as f32);
                for l in 0..32 {
                    let q = qs[32 * j + l];
                    let h0 = ((qh[l] >> (2 * j)) & 1) << 4;
                    let h1 = ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    y[64 * j + l] = d0 * ((q & 0xF) | h0) as f32 - mm0;
                    y[64 * j + 32 + l] = d1 * ((q >> 4) | h1) as f32 - mm1;
                }
            }
        }),
        GgmlDType::Q6K => blocks.for_each(|(b, y)| {
            // ql[128] | qh[64] | scales[16] (i8) | d
            let d = f16_at(b, 208);
            for half in 0..2 {
                let ql = &b[64 * half..64 * half + 64];
                let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                let y = &mut y[128 * half..128 * half + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }),
    }
}
