//! Reference quantizers (f32 -> ggml blocks).
//!
//! Weight formats follow ggml's `quantize_row_*_ref` rounding. The activation formats
//! (Q8_0, Q8_1, Q8_K) round half to even, as llama.cpp's x86 SIMD quantizers
//! (`_mm256_round_ps`, `nearest_int`) do, so our matmul inputs match llama.cpp's bit for bit
//! in the common case. Q4_K / Q6_K use a simple min/max (not ggml's RMSE search) rounding:
//! valid blocks, slightly less accurate ones; they exist to build test files.

use super::dtype::QK_K;
use super::{GgmlDType, QuantError};

/// Writes an f32 as little-endian f16 bits.
#[inline(always)]
fn put_f16(out: &mut [u8], v: f32) {
    out[..2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// The f32 value an f16 write of `v` will read back as (round to nearest even, as F16C).
#[inline(always)]
pub(crate) fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Quantizes `src` (a whole number of blocks) into a new buffer of format `dtype`.
pub fn quantize(dtype: GgmlDType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let len = dtype.row_bytes(src.len()).ok_or(QuantError::BadShape {
        dtype,
        rows: 1,
        cols: src.len(),
        reason: "element count is not a multiple of the block size",
    })?;
    let mut out = vec![0u8; len];
    quantize_into(dtype, src, &mut out)?;
    Ok(out)
}

/// Quantizes `src` into `out`, which must be exactly `dtype.row_bytes(src.len())` long.
pub(crate) fn quantize_into(
    dtype: GgmlDType,
    src: &[f32],
    out: &mut [u8],
) -> Result<(), QuantError> {
    let expected = dtype.row_bytes(src.len()).ok_or(QuantError::BadShape {
        dtype,
        rows: 1,
        cols: src.len(),
        reason: "element count is not a multiple of the block size",
    })?;
    if out.len() != expected {
        return Err(QuantError::SizeMismatch {
            what: "quantize output",
            expected,
            actual: out.len(),
        });
    }
    let blocks = out
        .chunks_exact_mut(dtype.type_size())
        .zip(src.chunks_exact(dtype.block_size()));
    match dtype {
        GgmlDType::F32 => blocks.for_each(|(o, x)| o.copy_from_slice(&x[0].to_le_bytes())),
        GgmlDType::F16 => blocks.for_each(|(o, x)| put_f16(o, x[0])),
        GgmlDType::BF16 => blocks.for_each(|(o, x)| {
            o.copy_from_slice(&half::bf16::from_f32(x[0]).to_bits().to_le_bytes())
        }),
        GgmlDType::Q4_0 => blocks.for_each(|(o, x)| {
            let max = signed_absmax(x);
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(o, d);
            for j in 0..16 {
                // Truncation after +8.5 is ggml's rounding; the cast saturates at 0.
                let a = ((x[j] * id + 8.5) as u8).min(15);
                let b = ((x[j + 16] * id + 8.5) as u8).min(15);
                o[2 + j] = a | (b << 4);
            }
        }),
        GgmlDType::Q4_1 => blocks.for_each(|(o, x)| {
            let (min, max) = min_max(x);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(o, d);
            put_f16(&mut o[2..], min);
            for j in 0..16 {
                let a = (((x[j] - min) * id + 0.5) as u8).min(15);
                let b = (((x[j + 16] - min) * id + 0.5) as u8).min(15);
                o[4 + j] = a | (b << 4);
            }
        }),
        GgmlDType::Q5_0 => blocks.for_each(|(o, x)| {
            let max = signed_absmax(x);
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(o, d);
            let mut qh = 0u32;
            for j in 0..16 {
                let a = ((x[j] * id + 16.5) as u8).min(31);
                let b = ((x[j + 16] * id + 16.5) as u8).min(31);
                o[6 + j] = (a & 0xF) | ((b & 0xF) << 4);
                qh |= (((a >> 4) & 1) as u32) << j;
                qh |= (((b >> 4) & 1) as u32) << (j + 16);
            }
            o[2..6].copy_from_slice(&qh.to_le_bytes());
        }),
        GgmlDType::Q5_1 => blocks.for_each(|(o, x)| {
            let (min, max) = min_max(x);
            let d = (max - min) / 31.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put_f16(o, d);
            put_f16(&mut o[2..], min);
            let mut qh = 0u32;
            for j in 0..16 {
                let a = (((x[j] - min) * id + 0.5) as u8).min(31);
                let b = (((x[j + 16] - min) * id + 0.5) as u8).min(31);
                o[8 + j] = (a & 0xF) | ((b & 0xF) << 4);
                qh |= (((a >> 4) & 1) as u32) << j;
                qh |= (((b >> 4) & 1) as u32) << (j + 16);
            }
            o[4..8].copy_from_slice(&qh.to_le_bytes());
        }),
        GgmlDType::Q8_0 => blocks.for_each(|(o, x)| {
            let (d, _) = q8_block(x, &mut o[2..34]);
            put_f16(o, d);
        }),
        GgmlDType::Q8_1 => blocks.for_each(|(o, x)| {
            let (d, sum) = q8_block(x, &mut o[4..36]);
            put_f16(o, d);
            // ggml stores s = d * sum(q) rounded once to f16 (with the f32 d).
            put_f16(&mut o[2..], d * sum as f32);
        }),
        GgmlDType::Q8K => blocks.for_each(|(o, x)| q8k_block(x, o)),
        GgmlDType::Q4K => blocks.for_each(|(o, x)| q4k_block(x, o)),
        GgmlDType::Q6K => blocks.for_each(|(o, x)| q6k_block(x, o)),
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q5K => {
            return Err(QuantError::UnsupportedType {
                dtype,
                op: "quantize",
            })
        }
    }
    Ok(())
}

/// The element of largest magnitude, with its sign (first one on ties, as ggml).
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// (min, max) of a block.
fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// Symmetric int8 quantization of 32 values; returns (scale, sum of q). Written so that it
/// vectorises (every matmul quantizes its activations with it): see [`q8_amax`] and
/// [`q8_round`].
#[inline(always)]
pub(crate) fn q8_block(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    let amax = q8_amax(x);
    // 127/amax, not 1/d: llama.cpp's x86 quantizers (`quantize_row_q8_0/1`) scale this way, and
    // the two differ in the last bit often enough to move a rounding.
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = q8_round(v * id);
        sum += r as i32;
        *o = r as u8;
    }
    (amax / 127.0, sum)
}

/// The largest magnitude in `x` (NaN skipped, as `f32::max` does), as eight running maxima
/// so that it vectorises.
#[inline(always)]
pub(crate) fn q8_amax(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    for &v in chunks.remainder() {
        let a = v.abs();
        lanes[0] = if a > lanes[0] { a } else { lanes[0] };
    }
    lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m })
}

/// `t` (|t| <= 127) rounded half to even: adding 1.5·2^23 leaves the integer in the low bits
/// of the sum (the FPU rounds half to even), read without a saturating cast. NaN (a NaN
/// value, or an infinite one times a zero scale) gives 0, as the cast did.
#[inline(always)]
pub(crate) fn q8_round(t: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let t = if t.is_nan() { 0.0 } else { t };
    ((t + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32) as i8
}

/// Q8_K: f32 scale chosen so the largest-magnitude value maps to -128, plus 16-sums.
fn q8k_block(x: &[f32], o: &mut [u8]) {
    let max = signed_absmax(x);
    if max == 0.0 {
        o.fill(0);
        return;
    }
    let iscale = -128.0 / max;
    let mut bsums = [0i16; 16];
    for (j, &v) in x.iter().enumerate() {
        let q = (iscale * v).round_ties_even().min(127.0) as i8;
        o[4 + j] = q as u8;
        bsums[j / 16] += q as i16;
    }
    o[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (j, s) in bsums.iter().enumerate() {
        o[4 + QK_K + 2 * j..4 + QK_K + 2 * j + 2].copy_from_slice(&s.to_le_bytes());
    }
}

/// Nearest integer, ties to even (ggml's `nearest_int`).
#[inline(always)]
fn nearest(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// Simple Q4_K: per 32-element sub-block min/max scale, 6-bit scales and mins.
fn q4k_block(x: &[f32], o: &mut [u8]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let (lo, hi) = min_max(sub);
        // ggml's model is x = d*sc*q - dmin*m with m >= 0, so the minimum is clamped to <= 0.
        let lo = lo.min(0.0);
        scales[j] = (hi - lo).max(0.0) / 15.0;
        mins[j] = -lo;
    }
    let max_scale = scales.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = mins.iter().fold(0f32, |a, &v| a.max(v));
    let inv_s = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_m = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = nearest(inv_s * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest(inv_m * mins[j]).clamp(0, 63) as u8;
    }
    let d = max_scale / 63.0;
    let dmin = max_min / 63.0;
    put_f16(o, d);
    put_f16(&mut o[2..], dmin);
    let sc = &mut o[4..16];
    sc.fill(0);
    for j in 0..8 {
        if j < 4 {
            sc[j] = ls[j];
            sc[j + 4] = lm[j];
        } else {
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            sc[j - 4] |= (ls[j] >> 4) << 6;
            sc[j] |= (lm[j] >> 4) << 6;
        }
    }
    let (d, dmin) = (f16_round(d), f16_round(dmin));
    let mut l = [0u8; QK_K];
    for j in 0..8 {
        let dq = d * ls[j] as f32;
        let dm = dmin * lm[j] as f32;
        if dq == 0.0 {
            continue;
        }
        for i in 0..32 {
            l[32 * j + i] = nearest((x[32 * j + i] + dm) / dq).clamp(0, 15) as u8;
        }
    }
    for j in 0..4 {
        for i in 0..32 {
            o[16 + 32 * j + i] = l[64 * j + i] | (l[64 * j + 32 + i] << 4);
        }
    }
}

/// Simple Q6_K: per 16-element sub-block signed-absmax scale, int8 sub-scales.
fn q6k_block(x: &[f32], o: &mut [u8]) {
    let mut scales = [0f32; 16];
    for (j, sub) in x.chunks_exact(16).enumerate() {
        scales[j] = signed_absmax(sub) / -32.0;
    }
    let max_scale = signed_absmax(&scales);
    o.fill(0);
    if max_scale == 0.0 {
        // All-zero block: zero scales, q = 32 (i.e. 0); ql/qh fill below.
        let mut l = [32u8; QK_K];
        pack_q6k(&mut l, o);
        return;
    }
    let iscale = -128.0 / max_scale;
    let mut ls = [0i8; 16];
    for j in 0..16 {
        ls[j] = nearest(iscale * scales[j]).clamp(-128, 127) as i8;
        o[192 + j] = ls[j] as u8;
    }
    let d = 1.0 / iscale;
    put_f16(&mut o[208..], d);
    let d = f16_round(d);
    let mut l = [32u8; QK_K];
    for j in 0..16 {
        let dq = d * ls[j] as f32;
        if dq == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest(x[16 * j + i] / dq).clamp(-32, 31) + 32) as u8;
        }
    }
    pack_q6k(&mut l, o);
}

/// Packs 256 6-bit values into Q6_K's ql/qh layout.
fn pack_q6k(l: &mut [u8; QK_K], o: &mut [u8]) {
    for n in 0..2 {
        for i in 0..32 {
            let q1 = l[128 * n + i];
            let q2 = l[128 * n + i + 32];
            let q3 = l[128 * n + i + 64];
            let q4 = l[128 * n + i + 96];
            o[64 * n + i] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            o[64 * n + i + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            o[128 + 32 * n + i] =
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod round_tests {
    use super::q8_block;
    use rand::{Rng, SeedableRng};

    /// The plain statement of the activation quantizer (what `q8_block` computes faster).
    fn reference(x: &[f32]) -> (f32, i32, Vec<u8>) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let q: Vec<i8> = x
            .iter()
            .map(|&v| (v * id).round_ties_even() as i8)
            .collect();
        let sum = q.iter().map(|&v| v as i32).sum();
        (amax / 127.0, sum, q.iter().map(|&v| v as u8).collect())
    }

    #[test]
    fn q8_block_rounds_half_to_even_like_the_plain_quantizer() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut blocks: Vec<Vec<f32>> = (0..2000)
            .map(|i| {
                let scale = 10f32.powi(i % 7 - 3);
                (0..32)
                    .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                    .collect()
            })
            .collect();
        // Exact halves after scaling, zeros, a NaN, an infinity, a short block.
        blocks.push((0..32).map(|i| i as f32 - 15.5).collect());
        blocks.push((0..32).map(|i| (i as f32 * 0.5) - 8.0).collect());
        blocks.push(vec![0.0; 32]);
        blocks.push(
            (0..32)
                .map(|i| if i == 3 { f32::NAN } else { i as f32 })
                .collect(),
        );
        blocks.push(
            (0..32)
                .map(|i| if i == 5 { f32::INFINITY } else { 1.0 })
                .collect(),
        );
        blocks.push(vec![-0.0, 2.5, -127.0, 0.49999997, 3.0]);
        for x in &blocks {
            let mut q = vec![0u8; x.len()];
            let (d, sum) = q8_block(x, &mut q);
            let (rd, rsum, rq) = reference(x);
            assert_eq!((d.to_bits(), sum, &q), (rd.to_bits(), rsum, &rq), "{x:?}");
        }
    }
}
