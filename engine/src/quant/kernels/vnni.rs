//! x86_64 VNNI kernels for the int8 block formats, selected at runtime over AVX2.
//!
//! `vpdpbusd` sums four adjacent u8·i8 products straight into i32 lanes: one instruction where
//! AVX2 needs `vpmaddubsw` + `vpmaddwd`, and no i16 saturation. The same bodies are compiled
//! twice (see [`vnni_set!`]): with AVX512-VNNI + AVX512VL (EVEX encoding, 32 ymm registers, which
//! the 4x4 micro-kernels need for their 16 accumulators) and with AVX-VNNI (VEX encoding, 16
//! registers; there the 4x4 kernels would spill, so that set only replaces the one-row kernels).
//!
//! Signed×signed tricks, all exact in i32:
//! * Q4_x: the nibbles 0..15 are the unsigned operand directly; Q4_0's zero point is applied as
//!   `q·y − 8·Σy` (a second `vpdpbusd` against a splat of 8).
//! * Q8_0 one row: `|w|·sign(y, w)` as in ggml (Q8_0 activations never hold −128).
//! * Q8_0 4x4: `(w + 128)·y − 128·Σy`, with `−128·Σy` computed once per activation block and
//!   used as the accumulator input, so each weight×activation pair costs a single `vpdpbusd`.

use super::avx2::{h2f, h2f_pair, hsum, ld256, nibbles};
use super::{VecDot4x1Fn, VecDot4x4Fn, VecDotFn};
use crate::quant::GgmlDType;
use std::arch::x86_64::*;

/// One VNNI kernel set: its name, one-row kernels and 4x4 micro-kernels.
pub(super) struct Set {
    /// Instruction-set name reported by `Kernels::name`.
    pub name: &'static str,
    /// One weight row · one activation row.
    pub dots: Vec<(GgmlDType, VecDotFn)>,
    /// Four weight rows · four activation rows.
    pub dots4x4: Vec<(GgmlDType, VecDot4x4Fn)>,
    /// Four weight rows · one activation row, lane for lane the same arithmetic as `dots4x4`,
    /// so a pair's result does not depend on which kernel computed it.
    pub dots4x1: Vec<(GgmlDType, VecDot4x1Fn)>,
}

/// Every VNNI set this CPU supports, best first (tests check them all; dispatch takes the first).
pub(super) fn sets() -> Vec<Set> {
    let base = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let mut v = Vec::new();
    if base && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
        v.push(evex::set());
    }
    if base && is_x86_feature_detected!("avxvnni") {
        v.push(vex::set());
    }
    v
}

/// Defines module `$m` holding the kernels compiled for `$feat` with `$dp` as the u8·i8
/// dot-accumulate; `$x4x4` says whether the set hands out the register-hungry 4x4 kernels.
macro_rules! vnni_set {
    ($m:ident, $name:literal, $feat:literal, $dp:ident, $x4x4:literal) => {
        mod $m {
            use super::*;

            /// The kernel set; only called by `sets()` after detecting `$feat`.
            pub(super) fn set() -> Set {
                Set {
                    name: $name,
                    dots: vec![
                        (GgmlDType::Q4_0, q4_0_dot as VecDotFn),
                        (GgmlDType::Q4_1, q4_1_dot),
                        (GgmlDType::Q8_0, q8_0_dot),
                    ],
                    dots4x4: if $x4x4 {
                        vec![
                            (GgmlDType::Q4_1, q4_1_dot4x4 as VecDot4x4Fn),
                            (GgmlDType::Q8_0, q8_0_dot4x4),
                        ]
                    } else {
                        Vec::new()
                    },
                    dots4x1: if $x4x4 {
                        vec![
                            (GgmlDType::Q4_1, q4_1_dot4x1 as VecDot4x1Fn),
                            (GgmlDType::Q8_0, q8_0_dot4x1),
                        ]
                    } else {
                        Vec::new()
                    },
                }
            }

            /// Safe wrapper: checks `w`/`a` hold `n` elements of their formats.
            macro_rules! wrapper {
                ($name_:ident, $imp:ident, $wt:expr, $at:expr) => {
                    fn $name_(n: usize, w: &[u8], a: &[u8]) -> f32 {
                        let (wt, at): (GgmlDType, GgmlDType) = ($wt, $at);
                        assert!(
                            wt.row_bytes(n).is_some_and(|b| w.len() >= b)
                                && at.row_bytes(n).is_some_and(|b| a.len() >= b),
                            "vec-dot operand too short"
                        );
                        // SAFETY: handed out by `sets()` only after detecting the features of
                        // this set; the assert guarantees every block read is in bounds.
                        unsafe { $imp(n, w.as_ptr(), a.as_ptr()) }
                    }
                };
            }

            /// Safe 4x4 wrapper: checks all eight operands.
            macro_rules! wrapper4x4 {
                ($name_:ident, $imp:ident, $wt:expr, $at:expr) => {
                    fn $name_(n: usize, w: [&[u8]; 4], a: [&[u8]; 4]) -> [[f32; 4]; 4] {
                        let (wt, at): (GgmlDType, GgmlDType) = ($wt, $at);
                        assert!(
                            wt.row_bytes(n)
                                .is_some_and(|b| w.iter().all(|w| w.len() >= b))
                                && at
                                    .row_bytes(n)
                                    .is_some_and(|b| a.iter().all(|a| a.len() >= b)),
                            "vec-dot operand too short"
                        );
                        // SAFETY: as for the one-row wrapper.
                        let cols =
                            unsafe { $imp::<4>(n, w.map(<[u8]>::as_ptr), a.map(<[u8]>::as_ptr)) };
                        let mut out = [[0f32; 4]; 4];
                        for (c, col) in cols.into_iter().enumerate() {
                            for (r, v) in col.into_iter().enumerate() {
                                out[r][c] = v;
                            }
                        }
                        out
                    }
                };
            }

            /// Safe 4x1 wrapper: the 4x4 body with one activation row.
            macro_rules! wrapper4x1 {
                ($name_:ident, $imp:ident, $wt:expr, $at:expr) => {
                    fn $name_(n: usize, w: [&[u8]; 4], a: &[u8]) -> [f32; 4] {
                        let (wt, at): (GgmlDType, GgmlDType) = ($wt, $at);
                        assert!(
                            wt.row_bytes(n)
                                .is_some_and(|b| w.iter().all(|w| w.len() >= b))
                                && at.row_bytes(n).is_some_and(|b| a.len() >= b),
                            "vec-dot operand too short"
                        );
                        // SAFETY: as for the one-row wrapper.
                        let [col] = unsafe { $imp::<1>(n, w.map(<[u8]>::as_ptr), [a.as_ptr()]) };
                        col
                    }
                };
            }

            wrapper!(q4_0_dot, q4_0_impl, GgmlDType::Q4_0, GgmlDType::Q8_0);
            wrapper!(q4_1_dot, q4_1_impl, GgmlDType::Q4_1, GgmlDType::Q8_1);
            wrapper!(q8_0_dot, q8_0_impl, GgmlDType::Q8_0, GgmlDType::Q8_0);
            wrapper4x4!(q4_1_dot4x4, q4_1_4x4_impl, GgmlDType::Q4_1, GgmlDType::Q8_1);
            wrapper4x4!(q8_0_dot4x4, q8_0_4x4_impl, GgmlDType::Q8_0, GgmlDType::Q8_0);
            wrapper4x1!(q4_1_dot4x1, q4_1_4x4_impl, GgmlDType::Q4_1, GgmlDType::Q8_1);
            wrapper4x1!(q8_0_dot4x1, q8_0_4x4_impl, GgmlDType::Q8_0, GgmlDType::Q8_0);

            /// Sums of four adjacent u8·i8 products added to the i32 lanes of `acc`.
            #[inline]
            #[target_feature(enable = $feat)]
            fn dp(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
                $dp(acc, u, s)
            }

            /// Four unaligned bytes at `p` as an i32 (the two f16 of a Q4_1 block header).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn rd32(p: *const u8) -> i32 {
                // SAFETY: the caller guarantees four readable bytes at `p`.
                unsafe { std::ptr::read_unaligned(p as *const i32) }
            }

            /// One Q4_0·Q8_0 block added to `acc`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q4_0_block(wb: *const u8, ab: *const u8, acc: &mut __m256) {
                // SAFETY: the caller guarantees 18 bytes at `wb` and 34 at `ab`.
                unsafe {
                    let y = ld256(ab.add(2));
                    let z = _mm256_setzero_si256();
                    // (q − 8)·y = q·y − 8·Σy.
                    let p = _mm256_sub_epi32(
                        dp(z, nibbles(wb.add(2)), y),
                        dp(z, _mm256_set1_epi8(8), y),
                    );
                    let d = _mm256_set1_ps(h2f(wb) * h2f(ab));
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn q4_0_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
                let mut acc = _mm256_setzero_ps();
                // SAFETY (whole body): n/32 blocks of 18 (w) and 34 (a) bytes are readable.
                unsafe {
                    for i in 0..n / 32 {
                        q4_0_block(w.add(18 * i), a.add(34 * i), &mut acc);
                    }
                }
                hsum(acc)
            }

            /// One Q4_1·Q8_1 block: `d_w·d_a·Σq·y` into `acc`, `m_w·s_a` into lane 1 of `mins`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_block(
                wb: *const u8,
                ab: *const u8,
                acc: &mut __m256,
                mins: &mut __m128,
            ) {
                // SAFETY: the caller guarantees 20 bytes at `wb` and 36 at `ab`.
                unsafe {
                    let prod = _mm_mul_ps(h2f_pair(wb), h2f_pair(ab));
                    *mins = _mm_add_ps(*mins, prod);
                    let p = dp(_mm256_setzero_si256(), nibbles(wb.add(4)), ld256(ab.add(4)));
                    *acc =
                        _mm256_fmadd_ps(_mm256_broadcastss_ps(prod), _mm256_cvtepi32_ps(p), *acc);
                }
            }

            #[target_feature(enable = $feat)]
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

            /// One Q8_0·Q8_0 block added to `acc`.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_block(wb: *const u8, ab: *const u8, acc: &mut __m256) {
                // SAFETY: the caller guarantees 34 bytes at `wb` and at `ab`.
                unsafe {
                    let q = ld256(wb.add(2));
                    // |w|·sign(y, w): exact unless y holds −128, which Q8_0 quantizing never
                    // produces (values are rounded into −127..=127).
                    let p = dp(
                        _mm256_setzero_si256(),
                        _mm256_abs_epi8(q),
                        _mm256_sign_epi8(ld256(ab.add(2)), q),
                    );
                    let d = _mm256_set1_ps(h2f(wb) * h2f(ab));
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
                }
            }

            #[target_feature(enable = $feat)]
            unsafe fn q8_0_impl(n: usize, w: *const u8, a: *const u8) -> f32 {
                let mut acc = _mm256_setzero_ps();
                // SAFETY (whole body): n/32 blocks of 34 bytes are readable at w and a.
                unsafe {
                    for i in 0..n / 32 {
                        q8_0_block(w.add(34 * i), a.add(34 * i), &mut acc);
                    }
                }
                hsum(acc)
            }

            /// `out[c][r]`: ggml's `hsum_float_8` of `acc[c][r]` plus lane r of `extra[c]`.
            #[inline]
            #[target_feature(enable = $feat)]
            fn finish4x4<const C: usize>(
                acc: [[__m256; 4]; C],
                extra: [__m128; C],
            ) -> [[f32; 4]; C] {
                let mut out = [[0f32; 4]; C];
                for c in 0..C {
                    let mut e = [0f32; 4];
                    // SAFETY: `e` is four f32, exactly one unaligned 128-bit store.
                    unsafe { _mm_storeu_ps(e.as_mut_ptr(), extra[c]) };
                    for r in 0..4 {
                        out[c][r] = hsum(acc[c][r]) + e[r];
                    }
                }
                out
            }

            /// Four Q4_1 weight rows × four Q8_1 activation rows; `out[r][c]` is
            /// `dot(w[r], a[c])`. Each weight block is unpacked once and each activation block
            /// loaded once per step, then reused across the 16 pairs (prefill / batched decode).
            /// Every pair keeps ggml's arithmetic: eight i32 lanes of four products each,
            /// `acc = fma(d_w·d_a, lanes, acc)` block after block in its own accumulator (16
            /// of them: this needs the 32 registers of AVX512VL), and `m_w·s_a` (exact: two
            /// f16) summed in order.
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_4x4_impl<const C: usize>(
                n: usize,
                w: [*const u8; 4],
                a: [*const u8; C],
            ) -> [[f32; 4]; C] {
                let mut acc = [[_mm256_setzero_ps(); 4]; C];
                let mut mins = [_mm_setzero_ps(); C];
                let odd = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
                let even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
                let lane = [
                    _mm256_set1_epi32(0),
                    _mm256_set1_epi32(1),
                    _mm256_set1_epi32(2),
                    _mm256_set1_epi32(3),
                ];
                let z = _mm256_setzero_si256();
                // SAFETY (whole body): n/32 blocks of 20 bytes at each w[r] and 36 at each a[c].
                unsafe {
                    for i in 0..n / 32 {
                        let wb = w.map(|p| p.add(20 * i));
                        // [d0 m0 d1 m1 d2 m2 d3 m3] from the four block headers; [m0..m3].
                        let dm = _mm256_cvtph_ps(_mm_set_epi32(
                            rd32(wb[3]),
                            rd32(wb[2]),
                            rd32(wb[1]),
                            rd32(wb[0]),
                        ));
                        let m = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, odd));
                        let d = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, even));
                        let q = [
                            nibbles(wb[0].add(4)),
                            nibbles(wb[1].add(4)),
                            nibbles(wb[2].add(4)),
                            nibbles(wb[3].add(4)),
                        ];
                        for c in 0..C {
                            let ab = a[c].add(36 * i);
                            let ds = h2f_pair(ab);
                            // d_r·d_a for the four rows (exact: two f16), one lane each.
                            let scale =
                                _mm256_castps128_ps256(_mm_mul_ps(d, _mm_shuffle_ps(ds, ds, 0)));
                            let y = ld256(ab.add(4));
                            for r in 0..4 {
                                let p = _mm256_cvtepi32_ps(dp(z, q[r], y));
                                let sr = _mm256_permutevar8x32_ps(scale, lane[r]);
                                acc[c][r] = _mm256_fmadd_ps(sr, p, acc[c][r]);
                            }
                            let sa = _mm_movehdup_ps(ds);
                            mins[c] = _mm_fmadd_ps(m, _mm_shuffle_ps(sa, sa, 0), mins[c]);
                        }
                    }
                }
                finish4x4(acc, mins)
            }

            /// Four Q8_0 weight rows × four Q8_0 activation rows; `out[r][c]` is
            /// `dot(w[r], a[c])`, each pair in ggml's arithmetic (as for Q4_1). Uses
            /// `(w + 128)·y − 128·Σy` (the same i32 lanes as ggml's signed products): the
            /// unsigned weights are made once per block and `−128·Σy` once per activation block
            /// (as the accumulator input), so each pair's integer part is one `vpdpbusd`.
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_4x4_impl<const C: usize>(
                n: usize,
                w: [*const u8; 4],
                a: [*const u8; C],
            ) -> [[f32; 4]; C] {
                let mut acc = [[_mm256_setzero_ps(); 4]; C];
                let bias = _mm256_set1_epi8(-128);
                let z = _mm256_setzero_si256();
                // SAFETY (whole body): n/32 blocks of 34 bytes at each w[r] and a[c].
                unsafe {
                    for i in 0..n / 32 {
                        let wb = w.map(|p| p.add(34 * i));
                        let d = [
                            _mm256_set1_ps(h2f(wb[0])),
                            _mm256_set1_ps(h2f(wb[1])),
                            _mm256_set1_ps(h2f(wb[2])),
                            _mm256_set1_ps(h2f(wb[3])),
                        ];
                        // w xor 0x80 is w + 128 as u8.
                        let u = [
                            _mm256_xor_si256(ld256(wb[0].add(2)), bias),
                            _mm256_xor_si256(ld256(wb[1].add(2)), bias),
                            _mm256_xor_si256(ld256(wb[2].add(2)), bias),
                            _mm256_xor_si256(ld256(wb[3].add(2)), bias),
                        ];
                        for c in 0..C {
                            let ab = a[c].add(34 * i);
                            let y = ld256(ab.add(2));
                            let da = _mm256_set1_ps(h2f(ab));
                            // 0x80 as the unsigned operand: lanes of 128·Σy, negated.
                            let corr = _mm256_sub_epi32(z, dp(z, bias, y));
                            for r in 0..4 {
                                let p = _mm256_cvtepi32_ps(dp(corr, u[r], y));
                                acc[c][r] = _mm256_fmadd_ps(_mm256_mul_ps(d[r], da), p, acc[c][r]);
                            }
                        }
                    }
                }
                finish4x4(acc, [_mm_setzero_ps(); C])
            }
        }
    };
}

vnni_set!(
    evex,
    "avx512vnni",
    "avx2,fma,f16c,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32,
    true
);
vnni_set!(
    vex,
    "avxvnni",
    "avx2,fma,f16c,avxvnni",
    _mm256_dpbusd_avx_epi32,
    false
);
