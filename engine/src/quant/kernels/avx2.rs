//! x86_64 AVX2 + FMA + F16C vec-dot kernels, selected at runtime.
//!
//! Every `*_impl` function is `#[target_feature]` and therefore `unsafe` to call; the safe
//! wrappers below are private and only handed out by [`dots`] after the features were
//! detected, and they check the slice lengths the raw-pointer loops rely on.

use super::VecDotFn;
use crate::quant::dtype::QK_K;
use crate::quant::GgmlDType;
use std::arch::x86_64::*;

/// The AVX2 kernels, if this CPU has AVX2, FMA and F16C.
pub(super) fn dots() -> Option<Vec<(GgmlDType, VecDotFn)>> {
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        return None;
    }
    Some(vec![
        (GgmlDType::F32, f32_dot as VecDotFn),
        (GgmlDType::F16, f16_dot),
        (GgmlDType::BF16, bf16_dot),
        (GgmlDType::Q4_0, q4_0_dot),
        (GgmlDType::Q4_1, q4_1_dot),
        (GgmlDType::Q5_0, q5_0_dot),
        (GgmlDType::Q5_1, q5_1_dot),
        (GgmlDType::Q8_0, q8_0_dot),
        (GgmlDType::Q4K, q4k_dot),
        (GgmlDType::Q6K, q6k_dot),
    ])
}

/// The AVX2 dequantizers of the formats the default models use, if this CPU has AVX2, FMA
/// and F16C.
pub(super) fn dequantizers() -> Option<Vec<(GgmlDType, super::DequantFn)>> {
    dots()?;
    Some(vec![
        (GgmlDType::Q4_0, q4_0_dequant as super::DequantFn),
        (GgmlDType::Q4_1, q4_1_dequant),
        (GgmlDType::Q8_0, q8_0_dequant),
    ])
}

/// Defines the safe dequantizer `$name` around `$imp`, which reads `blocks` whole blocks.
macro_rules! dequantizer {
    ($name:ident, $imp:ident, $t:expr) => {
        fn $name(bytes: &[u8], out: &mut [f32]) {
            let t: GgmlDType = $t;
            let blocks = out.len() / t.block_size();
            assert!(
                out.len() % t.block_size() == 0 && bytes.len() == blocks * t.type_size(),
                "dequantize: {} bytes for {} elements",
                bytes.len(),
                out.len()
            );
            // SAFETY: handed out by `dequantizers()` only after feature detection; the assert
            // guarantees every block read and every store is in bounds.
            unsafe { $imp(blocks, bytes.as_ptr(), out.as_mut_ptr()) }
        }
    };
}

dequantizer!(q4_0_dequant, q4_0_dequant_impl, GgmlDType::Q4_0);
dequantizer!(q4_1_dequant, q4_1_dequant_impl, GgmlDType::Q4_1);
dequantizer!(q8_0_dequant, q8_0_dequant_impl, GgmlDType::Q8_0);

/// Writes the 32 nibble values of a Q4 block (`qs`: 16 bytes; low nibbles are elements 0..16,
/// high nibbles 16..32) as `(q - bias) · d + m`, multiply and add rounded separately as the
/// reference does.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_block(qs: *const u8, bias: i32, d: f32, m: Option<f32>, y: *mut f32) {
    let (dv, mv) = (_mm256_set1_ps(d), _mm256_set1_ps(m.unwrap_or(0.0)));
    let bv = _mm256_set1_epi32(bias);
    // SAFETY: the caller guarantees 16 readable bytes at `qs` and 32 writable floats at `y`.
    unsafe {
        let q = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let halves = [
            _mm_and_si128(q, mask),
            _mm_and_si128(_mm_srli_epi16(q, 4), mask),
        ];
        for (h, nib) in halves.into_iter().enumerate() {
            for k in 0..2 {
                let bytes = if k == 0 { nib } else { _mm_srli_si128(nib, 8) };
                let ints = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), bv);
                let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(ints), dv);
                if m.is_some() {
                    v = _mm256_add_ps(v, mv);
                }
                _mm256_storeu_ps(y.add(16 * h + 8 * k), v);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_dequant_impl(blocks: usize, b: *const u8, y: *mut f32) {
    for i in 0..blocks {
        // SAFETY: block `i` is 18 bytes at `b + 18 i` and 32 floats at `y + 32 i` (checked by
        // the wrapper).
        unsafe {
            let p = b.add(18 * i);
            q4_block(p.add(2), 8, h2f(p), None, y.add(32 * i));
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_dequant_impl(blocks: usize, b: *const u8, y: *mut f32) {
    for i in 0..blocks {
        // SAFETY: block `i` is 20 bytes at `b + 20 i` and 32 floats at `y + 32 i` (checked by
        // the wrapper).
        unsafe {
            let p = b.add(20 * i);
            q4_block(p.add(4), 0, h2f(p), Some(h2f(p.add(2))), y.add(32 * i));
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_dequant_impl(blocks: usize, b: *const u8, y: *mut f32) {
    for i in 0..blocks {
        // SAFETY: block `i` is 34 bytes at `b + 34 i` and 32 floats at `y + 32 i` (checked by
        // the wrapper).
        unsafe {
            let p = b.add(34 * i);
            let d = _mm256_set1_ps(h2f(p));
            for k in 0..4 {
                let q = _mm_loadl_epi64(p.add(2 + 8 * k) as *const __m128i);
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
                _mm256_storeu_ps(y.add(32 * i + 8 * k), v);
            }
        }
    }
}

/// The AVX2 four-activation-row kernels, if this CPU has AVX2, FMA and F16C.
pub(super) fn dots4() -> Option<Vec<(GgmlDType, super::VecDot4Fn)>> {
    dots()?;
    Some(vec![
        (GgmlDType::Q4_1, q4_1_dot4 as super::VecDot4Fn),
        (GgmlDType::Q8_0, q8_0_dot4),
    ])
}

/// Defines the safe four-row wrapper `$name` around `$imp` (see [`wrapper!`]).
macro_rules! wrapper4 {
    ($name:ident, $imp:ident, $wt:expr, $at:expr) => {
        fn $name(n: usize, w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
            let wt: GgmlDType = $wt;
            let at: GgmlDType = $at;
            assert!(
                wt.row_bytes(n).is_some_and(|b| w.len() >= b)
                    && at
                        .row_bytes(n)
                        .is_some_and(|b| a.iter().all(|a| a.len() >= b)),
                "vec-dot operand too short"
            );
            // SAFETY: handed out by `dots4()` only after feature detection; the assert
            // guarantees every block read is in bounds.
            unsafe { $imp(n, w.as_ptr(), a.map(<[u8]>::as_ptr)) }
        }
    };
}

wrapper4!(q4_1_dot4, q4_1_x4_impl, GgmlDType::Q4_1, GgmlDType::Q8_1);
wrapper4!(q8_0_dot4, q8_0_x4_impl, GgmlDType::Q8_0, GgmlDType::Q8_0);

/// Defines the safe wrapper `$name` around `$imp` after checking that `w` holds `n` elements
/// of `$wt` and `a` holds `n` elements of the activation format `$at`.
macro_rules! wrapper {
    ($name:ident, $imp:ident, $wt:expr, $at:expr) => {
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let wt: GgmlDType = $wt;
            let at: GgmlDType = $at;
            assert!(
                wt.row_bytes(n).is_some_and(|b| w.len() >= b)
                    && at.row_bytes(n).is_some_and(|b| a.len() >= b),
                "vec-dot operand too short"
            );
            // SAFETY: `dots()` only hands this function out after detecting avx2, fma and
            // f16c, and the assert above guarantees every block the kernel reads is in bounds.
            unsafe { $imp(n, w.as_ptr(), a.as_ptr()) }
        }
    };
}

wrapper!(f32_dot, f32_impl, GgmlDType::F32, GgmlDType::F32);
wrapper!(f16_dot, f16_impl, GgmlDType::F16, GgmlDType::F32);
wrapper!(bf16_dot, bf16_impl, GgmlDType::BF16, GgmlDType::F32);
wrapper!(q4_0_dot, q4_0_impl, GgmlDType::Q4_0, GgmlDType::Q8_0);
wrapper!(q4_1_dot, q4_1_impl, GgmlDType::Q4_1, GgmlDType::Q8_1);
wrapper!(q5_0_dot, q5_0_impl, GgmlDType::Q5_0, GgmlDType::Q8_0);
wrapper!(q5_1_dot, q5_1_impl, GgmlDType::Q5_1, GgmlDType::Q8_1);
wrapper!(q8_0_dot, q8_0_impl, GgmlDType::Q8_0, GgmlDType::Q8_0);
wrapper!(q4k_dot, q4k_impl, GgmlDType::Q4K, GgmlDType::Q8K);
wrapper!(q6k_dot, q6k_impl, GgmlDType::Q6K, GgmlDType::Q8K);

/// f16 at `p` (unaligned) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn h2f(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `p`.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// f32 at `p` (unaligned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_f32(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees four readable bytes at `p`.
    unsafe { std::ptr::read_unaligned(p as *const f32) }
}

/// Horizontal sum of 8 floats in ggml's `hsum_float_8` order: (0+4 + 2+6) + (1+5 + 3+7).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 32 bytes at `p` (unaligned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn ld256(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// The 32 nibbles of 16 bytes at `p` as bytes, ggml order: low nibbles are elements 0..16,
/// high nibbles elements 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let t = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let m = _mm_set1_epi8(0xF);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), m), _mm_and_si128(t, m))
}

/// 0xFF in byte j where bit j of `bits` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits_to_bytes(bits: u32) -> __m256i {
    // Byte k takes byte k/8 of `bits`; OR-ing all bits but k%8 leaves 0xFF iff that bit is set.
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let v = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
    let v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1))
}

/// Sums of 4 adjacent u8·i8 products as 8 i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Sums of 4 adjacent i8·i8 products as 8 i32 (`y` must not hold -128 where `x` < 0).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_i8_i8(x: __m256i, y: __m256i) -> __m256i {
    dot_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (w, a) = (w as *const f32, a as *const f32);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (whole body): n f32 are readable at w and a (wrapper check); i + 32 <= n below.
    unsafe {
        while i + 32 <= n {
            for (k, c) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(w.add(i + 8 * k));
                *c = _mm256_fmadd_ps(x, _mm256_loadu_ps(a.add(i + 8 * k)), *c);
            }
            i += 32;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < n {
            s = (*w.add(i)).mul_add(*a.add(i), s);
            i += 1;
        }
        s
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let a = a as *const f32;
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    // SAFETY (whole body): n f16 at w and n f32 at a are readable; i + 16 <= n below.
    unsafe {
        while i + 16 <= n {
            for (k, c) in acc.iter_mut().enumerate() {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * (i + 8 * k)) as *const __m128i));
                *c = _mm256_fmadd_ps(x, _mm256_loadu_ps(a.add(i + 8 * k)), *c);
            }
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
        while i < n {
            s = h2f(w.add(2 * i)).mul_add(*a.add(i), s);
            i += 1;
        }
        s
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let a = a as *const f32;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (whole body): n bf16 at w and n f32 at a are readable; i + 8 <= n below.
    unsafe {
        while i + 8 <= n {
            let h = _mm_loadu_si128(w.add(2 * i) as *const __m128i);
            // bf16 is the top half of an f32.
            let x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(a.add(i)), acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            let bits = std::ptr::read_unaligned(w.add(2 * i) as *const u16);
            s = f32::from_bits((bits as u32) << 16).mul_add(*a.add(i), s);
            i += 1;
        }
        s
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let off = _mm256_set1_epi8(8);
    // SAFETY (whole body): n/32 blocks of 18 (w) and 34 (a) bytes are readable.
    unsafe {
        for i in 0..n / 32 {
            let (wb, ab) = (w.add(18 * i), a.add(34 * i));
            let d = _mm256_set1_ps(h2f(wb) * h2f(ab));
            let q = _mm256_sub_epi8(nibbles(wb.add(2)), off);
            let p = dot_i8_i8(q, ld256(ab.add(2)));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
        }
    }
    hsum(acc)
}

/// The two f16 at `p` (a block's `d` and `m`/`s`) as f32 lanes 0 and 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn h2f_pair(p: *const u8) -> __m128 {
    // SAFETY: the caller guarantees four readable bytes at `p`.
    let bits = unsafe { std::ptr::read_unaligned(p as *const u32) };
    _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))
}

/// One Q4_1·Q8_1 block: adds `d_w·d_a·sum(q_w·q_a)` to `acc` and `m_w·s_a` to lane 1 of `mins`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_block(wb: *const u8, ab: *const u8, acc: &mut __m256, mins: &mut __m128) {
    // SAFETY: the caller guarantees a whole block at `wb` (20 bytes) and `ab` (36 bytes).
    unsafe {
        // [d_w·d_a, m_w·s_a] from one conversion per operand.
        let prod = _mm_mul_ps(h2f_pair(wb), h2f_pair(ab));
        *mins = _mm_add_ps(*mins, prod);
        let p = dot_u8_i8(nibbles(wb.add(4)), ld256(ab.add(4)));
        *acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(prod), _mm256_cvtepi32_ps(p), *acc);
    }
}

/// ggml's `ggml_vec_dot_q4_1_q8_1` arithmetic: one accumulator, block after block, and the
/// `m_w·s_a` terms (exact products of two f16) summed in order.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = _mm_setzero_ps();
    // SAFETY (whole body): n/32 blocks of 20 (w) and 36 (a) bytes are readable.
    unsafe {
        for i in 0..n / 32 {
            q4_1_block(w.add(20 * i), a.add(36 * i), &mut acc, &mut mins);
        }
    }
    hsum(acc) + _mm_cvtss_f32(_mm_movehdup_ps(mins))
}

/// Q4_1 weights against four Q8_1 activation rows at once: the weight block is unpacked once
/// and reused (prefill).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_x4_impl(n: usize, w: *const u8, a: [*const u8; 4]) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut mins = [_mm_setzero_ps(); 4];
    // SAFETY (whole body): n/32 blocks are readable at w (20 B) and at each a[r] (36 B).
    unsafe {
        for i in 0..n / 32 {
            let wb = w.add(20 * i);
            let wdm = h2f_pair(wb);
            let q = nibbles(wb.add(4));
            for r in 0..4 {
                let ab = a[r].add(36 * i);
                let prod = _mm_mul_ps(wdm, h2f_pair(ab));
                mins[r] = _mm_add_ps(mins[r], prod);
                let p = dot_u8_i8(q, ld256(ab.add(4)));
                acc[r] =
                    _mm256_fmadd_ps(_mm256_broadcastss_ps(prod), _mm256_cvtepi32_ps(p), acc[r]);
            }
        }
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        out[r] = hsum(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(mins[r]));
    }
    out
}

/// Q8_0 weights against four Q8_0 activation rows at once (prefill).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_x4_impl(n: usize, w: *const u8, a: [*const u8; 4]) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    // SAFETY (whole body): n/32 blocks of 34 bytes are readable at w and at each a[r].
    unsafe {
        for i in 0..n / 32 {
            let wb = w.add(34 * i);
            let dw = h2f(wb);
            let q = ld256(wb.add(2));
            let qa = _mm256_sign_epi8(q, q);
            for r in 0..4 {
                let ab = a[r].add(34 * i);
                let p = dot_u8_i8(qa, _mm256_sign_epi8(ld256(ab.add(2)), q));
                acc[r] =
                    _mm256_fmadd_ps(_mm256_set1_ps(dw * h2f(ab)), _mm256_cvtepi32_ps(p), acc[r]);
            }
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let hi = _mm256_set1_epi8(0xF0u8 as i8);
    // SAFETY (whole body): n/32 blocks of 22 (w) and 34 (a) bytes are readable.
    unsafe {
        for i in 0..n / 32 {
            let (wb, ab) = (w.add(22 * i), a.add(34 * i));
            let d = _mm256_set1_ps(h2f(wb) * h2f(ab));
            let qh = std::ptr::read_unaligned(wb.add(2) as *const u32);
            // Where the 5th bit is clear, value - 16 == nibble | 0xF0 as i8.
            let q = _mm256_or_si256(
                nibbles(wb.add(6)),
                _mm256_andnot_si256(bits_to_bytes(qh), hi),
            );
            let p = dot_i8_i8(q, ld256(ab.add(2)));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
        }
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let bit4 = _mm256_set1_epi8(0x10);
    // SAFETY (whole body): n/32 blocks of 24 (w) and 36 (a) bytes are readable.
    unsafe {
        for i in 0..n / 32 {
            let (wb, ab) = (w.add(24 * i), a.add(36 * i));
            summs += h2f(wb.add(2)) * h2f(ab.add(2));
            let qh = std::ptr::read_unaligned(wb.add(4) as *const u32);
            let q = _mm256_or_si256(
                nibbles(wb.add(8)),
                _mm256_and_si256(bits_to_bytes(qh), bit4),
            );
            let p = dot_u8_i8(q, ld256(ab.add(4)));
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(h2f(wb) * h2f(ab)),
                _mm256_cvtepi32_ps(p),
                acc,
            );
        }
    }
    hsum(acc) + summs
}

/// ggml's `ggml_vec_dot_q8_0_q8_0` arithmetic: one accumulator, block after block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // SAFETY (whole body): n/32 blocks of 34 bytes are readable at w and at a.
    unsafe {
        for i in 0..n / 32 {
            let (wb, ab) = (w.add(34 * i), a.add(34 * i));
            let p = dot_i8_i8(ld256(wb.add(2)), ld256(ab.add(2)));
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(h2f(wb) * h2f(ab)),
                _mm256_cvtepi32_ps(p),
                acc,
            );
        }
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summ = 0f32;
    let m4 = _mm256_set1_epi8(0xF);
    // SAFETY (whole body): n/256 blocks of 144 (w) and 292 (a) bytes are readable.
    unsafe {
        for i in 0..n / QK_K {
            let (wb, ab) = (w.add(144 * i), a.add(292 * i));
            let yd = ld_f32(ab);
            let sc_bytes: [u8; 12] = std::ptr::read_unaligned(wb.add(4) as *const [u8; 12]);
            let mut msum = 0i32;
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let (s0, m0) = crate::quant::dequant::scale_min_k4(2 * j, &sc_bytes);
                let (s1, m1) = crate::quant::dequant::scale_min_k4(2 * j + 1, &sc_bytes);
                let bs = |k: usize| {
                    std::ptr::read_unaligned(ab.add(4 + QK_K + 2 * k) as *const i16) as i32
                };
                msum += m0 as i32 * (bs(4 * j) + bs(4 * j + 1))
                    + m1 as i32 * (bs(4 * j + 2) + bs(4 * j + 3));
                let q = ld256(wb.add(16 + 32 * j));
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                let plo = _mm256_maddubs_epi16(lo, ld256(ab.add(4 + 64 * j)));
                let phi = _mm256_maddubs_epi16(hi, ld256(ab.add(4 + 64 * j + 32)));
                let plo = _mm256_madd_epi16(plo, _mm256_set1_epi16(s0 as i16));
                let phi = _mm256_madd_epi16(phi, _mm256_set1_epi16(s1 as i16));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
            }
            let d = yd * h2f(wb);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
            summ += yd * h2f(wb.add(2)) * msum as f32;
        }
    }
    hsum(acc) - summ
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let k32 = _mm256_set1_epi8(32);
    // SAFETY (whole body): n/256 blocks of 210 (w) and 292 (a) bytes are readable.
    unsafe {
        for i in 0..n / QK_K {
            let (wb, ab) = (w.add(210 * i), a.add(292 * i));
            let d = ld_f32(ab) * h2f(wb.add(208));
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let ql = wb.add(64 * half);
                let qhv = ld256(wb.add(128 + 32 * half));
                let sc = wb.add(192 + 8 * half) as *const i8;
                let y = ab.add(4 + 128 * half);
                let (l0, l1) = (ld256(ql), ld256(ql.add(32)));
                let h = |s: i32| {
                    let v = match s {
                        0 => qhv,
                        2 => _mm256_srli_epi16(qhv, 2),
                        4 => _mm256_srli_epi16(qhv, 4),
                        _ => _mm256_srli_epi16(qhv, 6),
                    };
                    _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
                };
                let q = [
                    _mm256_or_si256(_mm256_and_si256(l0, m4), h(0)),
                    _mm256_or_si256(_mm256_and_si256(l1, m4), h(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), h(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), h(6)),
                ];
                for (k, qk) in q.iter().enumerate() {
                    let yk = ld256(y.add(32 * k));
                    // (q - 32)·y computed as q·y - 32·y, both within i16 range.
                    let p = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(*qk, yk),
                        _mm256_maddubs_epi16(k32, yk),
                    );
                    let scv = _mm256_set_m128i(
                        _mm_set1_epi16(*sc.add(2 * k + 1) as i16),
                        _mm_set1_epi16(*sc.add(2 * k) as i16),
                    );
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scv));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum(acc)
}
