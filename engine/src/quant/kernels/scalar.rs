//! Portable scalar vec-dot kernels: the correctness oracle for the SIMD versions.
//!
//! Each kernel computes `dot(w, a)` over `n` elements, `w` a weight row in its ggml format and
//! `a` the activation row in the weight's vec-dot format (f32 bytes for float weights).
//! Integer parts are exact; the float combination follows ggml's per-block order.

use crate::quant::dequant::{f16_at, f32_at, q3k_scales, scale_min_k4};
use crate::quant::dtype::QK_K;

/// f32 weights · f32 activations.
pub(crate) fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    (0..n).fold(0.0, |s, i| f32_at(w, 4 * i).mul_add(f32_at(a, 4 * i), s))
}

/// f16 weights · f32 activations.
pub(crate) fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    (0..n).fold(0.0, |s, i| f16_at(w, 2 * i).mul_add(f32_at(a, 4 * i), s))
}

/// bf16 weights · f32 activations.
pub(crate) fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    (0..n).fold(0.0, |s, i| {
        let wv = half::bf16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32();
        wv.mul_add(f32_at(a, 4 * i), s)
    })
}

/// Integer dot of 32 activation int8 values with weight values given by `q(j)`.
#[inline(always)]
fn isum32(a: &[u8], q: impl Fn(usize) -> i32) -> i32 {
    (0..32).map(|j| q(j) * (a[j] as i8) as i32).sum()
}

/// Q4_0 · Q8_0.
pub(crate) fn dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / 32 {
        let (w, a) = (&w[18 * i..18 * i + 18], &a[34 * i..34 * i + 34]);
        let qs = &w[2..];
        let sumi = isum32(&a[2..], |j| {
            (if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 }) as i32 - 8
        });
        s += sumi as f32 * (f16_at(w, 0) * f16_at(a, 0));
    }
    s
}

/// Q4_1 · Q8_1.
pub(crate) fn dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / 32 {
        let (w, a) = (&w[20 * i..20 * i + 20], &a[36 * i..36 * i + 36]);
        let qs = &w[4..];
        let sumi = isum32(&a[4..], |j| {
            (if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 }) as i32
        });
        s += (f16_at(w, 0) * f16_at(a, 0)) * sumi as f32 + f16_at(w, 2) * f16_at(a, 2);
    }
    s
}

/// The 5-bit value `j` of a Q5 block (`qh` bits, `qs` nibbles), unsigned.
#[inline(always)]
fn q5(qh: u32, qs: &[u8], j: usize) -> i32 {
    let lo = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
    (lo as i32) | ((((qh >> j) & 1) as i32) << 4)
}

/// Q5_0 · Q8_0.
pub(crate) fn dot_q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / 32 {
        let (w, a) = (&w[22 * i..22 * i + 22], &a[34 * i..34 * i + 34]);
        let qh = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
        let sumi = isum32(&a[2..], |j| q5(qh, &w[6..], j) - 16);
        s += sumi as f32 * (f16_at(w, 0) * f16_at(a, 0));
    }
    s
}

/// Q5_1 · Q8_1.
pub(crate) fn dot_q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / 32 {
        let (w, a) = (&w[24 * i..24 * i + 24], &a[36 * i..36 * i + 36]);
        let qh = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
        let sumi = isum32(&a[4..], |j| q5(qh, &w[8..], j));
        s += (f16_at(w, 0) * f16_at(a, 0)) * sumi as f32 + f16_at(w, 2) * f16_at(a, 2);
    }
    s
}

/// Q8_0 · Q8_0.
pub(crate) fn dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / 32 {
        let (w, a) = (&w[34 * i..34 * i + 34], &a[34 * i..34 * i + 34]);
        let sumi = isum32(&a[2..], |j| (w[2 + j] as i8) as i32);
        s += sumi as f32 * (f16_at(w, 0) * f16_at(a, 0));
    }
    s
}

/// Q8_1 · Q8_1 (ggml has no such kernel; provided for completeness).
pub(crate) fn dot_q8_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / 32 {
        let (w, a) = (&w[36 * i..36 * i + 36], &a[36 * i..36 * i + 36]);
        let sumi = isum32(&a[4..], |j| (w[4 + j] as i8) as i32);
        s += sumi as f32 * (f16_at(w, 0) * f16_at(a, 0));
    }
    s
}

/// Q8_K activation block `i`: (scale, quants, 16-sums).
#[inline(always)]
fn q8k(a: &[u8], i: usize) -> (f32, &[u8], [i32; 16]) {
    let b = &a[292 * i..292 * i + 292];
    let mut bs = [0i32; 16];
    for (j, v) in bs.iter_mut().enumerate() {
        *v = i16::from_le_bytes([b[4 + QK_K + 2 * j], b[5 + QK_K + 2 * j]]) as i32;
    }
    (f32_at(b, 0), &b[4..4 + QK_K], bs)
}

/// Integer dot of 16 activation int8 values with weights `q(l)`.
#[inline(always)]
fn isum16(a: &[u8], q: impl Fn(usize) -> i32) -> i32 {
    (0..16).map(|l| q(l) * (a[l] as i8) as i32).sum()
}

/// Q2_K · Q8_K.
pub(crate) fn dot_q2k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / QK_K {
        let b = &w[84 * i..84 * i + 84];
        let (yd, q8, bs) = q8k(a, i);
        let (sc, qs) = (&b[0..16], &b[16..80]);
        let summs: i32 = (0..16).map(|j| (sc[j] >> 4) as i32 * bs[j]).sum();
        let mut isum = 0i32;
        for half in 0..2 {
            for shift in 0..4 {
                for g in 0..2 {
                    let k = half * 8 + shift * 2 + g;
                    let q = &qs[32 * half + 16 * g..];
                    let y = &q8[16 * k..];
                    isum +=
                        (sc[k] & 0xF) as i32 * isum16(y, |l| ((q[l] >> (2 * shift)) & 3) as i32);
                }
            }
        }
        s += yd * f16_at(b, 80) * isum as f32 - yd * f16_at(b, 82) * summs as f32;
    }
    s
}

/// Q3_K · Q8_K.
pub(crate) fn dot_q3k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / QK_K {
        let b = &w[110 * i..110 * i + 110];
        let (yd, q8, _) = q8k(a, i);
        let (hm, qs) = (&b[0..32], &b[32..96]);
        let scales = q3k_scales(&b[96..108]);
        let mut isum = 0i32;
        for half in 0..2 {
            for shift in 0..4 {
                let bit = 1u8 << (4 * half + shift);
                for g in 0..2 {
                    let k = half * 8 + shift * 2 + g;
                    let q = &qs[32 * half + 16 * g..];
                    let h = &hm[16 * g..];
                    let y = &q8[16 * k..];
                    isum += scales[k] as i32
                        * isum16(y, |l| {
                            ((q[l] >> (2 * shift)) & 3) as i32 - if h[l] & bit == 0 { 4 } else { 0 }
                        });
                }
            }
        }
        s += yd * f16_at(b, 108) * isum as f32;
    }
    s
}

/// Q4_K · Q8_K.
pub(crate) fn dot_q4k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / QK_K {
        let b = &w[144 * i..144 * i + 144];
        let (yd, q8, bs) = q8k(a, i);
        let (sc, qs) = (&b[4..16], &b[16..144]);
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..4 {
            let (s0, m0) = scale_min_k4(2 * j, sc);
            let (s1, m1) = scale_min_k4(2 * j + 1, sc);
            let q = &qs[32 * j..32 * j + 32];
            let lo: i32 = (0..32)
                .map(|l| (q[l] & 0xF) as i32 * (q8[64 * j + l] as i8) as i32)
                .sum();
            let hi: i32 = (0..32)
                .map(|l| (q[l] >> 4) as i32 * (q8[64 * j + 32 + l] as i8) as i32)
                .sum();
            isum += s0 as i32 * lo + s1 as i32 * hi;
            msum += m0 as i32 * (bs[4 * j] + bs[4 * j + 1])
                + m1 as i32 * (bs[4 * j + 2] + bs[4 * j + 3]);
        }
        s += yd * f16_at(b, 0) * isum as f32 - yd * f16_at(b, 2) * msum as f32;
    }
    s
}

/// Q5_K · Q8_K.
pub(crate) fn dot_q5k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / QK_K {
        let b = &w[176 * i..176 * i + 176];
        let (yd, q8, bs) = q8k(a, i);
        let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..4 {
            let (s0, m0) = scale_min_k4(2 * j, sc);
            let (s1, m1) = scale_min_k4(2 * j + 1, sc);
            let q = &qs[32 * j..32 * j + 32];
            let lo: i32 = (0..32)
                .map(|l| {
                    let v = (q[l] & 0xF) | (((qh[l] >> (2 * j)) & 1) << 4);
                    v as i32 * (q8[64 * j + l] as i8) as i32
                })
                .sum();
            let hi: i32 = (0..32)
                .map(|l| {
                    let v = (q[l] >> 4) | (((qh[l] >> (2 * j + 1)) & 1) << 4);
                    v as i32 * (q8[64 * j + 32 + l] as i8) as i32
                })
                .sum();
            isum += s0 as i32 * lo + s1 as i32 * hi;
            msum += m0 as i32 * (bs[4 * j] + bs[4 * j + 1])
                + m1 as i32 * (bs[4 * j + 2] + bs[4 * j + 3]);
        }
        s += yd * f16_at(b, 0) * isum as f32 - yd * f16_at(b, 2) * msum as f32;
    }
    s
}

/// Q6_K · Q8_K.
pub(crate) fn dot_q6k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / QK_K {
        let b = &w[210 * i..210 * i + 210];
        let (yd, q8, _) = q8k(a, i);
        let mut isum = 0i32;
        for half in 0..2 {
            let ql = &b[64 * half..];
            let qh = &b[128 + 32 * half..];
            let sc = &b[192 + 8 * half..];
            let y = &q8[128 * half..];
            for g in 0..2 {
                // Sub-blocks of 16: l in 16g..16g+16 for each of the four 32-wide quarters.
                let mut p = [0i32; 4];
                for l in 16 * g..16 * g + 16 {
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    p[0] += q1 * (y[l] as i8) as i32;
                    p[1] += q2 * (y[l + 32] as i8) as i32;
                    p[2] += q3 * (y[l + 64] as i8) as i32;
                    p[3] += q4 * (y[l + 96] as i8) as i32;
                }
                for (k, pk) in p.iter().enumerate() {
                    isum += (sc[g + 2 * k] as i8) as i32 * pk;
                }
            }
        }
        s += yd * f16_at(b, 208) * isum as f32;
    }
    s
}

/// Q8_K · Q8_K (no ggml kernel; provided for completeness).
pub(crate) fn dot_q8k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0f32;
    for i in 0..n / QK_K {
        let (wd, wq, _) = q8k(w, i);
        let (yd, yq, _) = q8k(a, i);
        let isum: i32 = (0..QK_K)
            .map(|j| (wq[j] as i8) as i32 * (yq[j] as i8) as i32)
            .sum();
        s += wd * yd * isum as f32;
    }
    s
}
