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
use super::{Tiled, VecDotFn, TILE_BLOCK_BYTES};
use crate::quant::GgmlDType;
use std::arch::x86_64::*;

/// One VNNI kernel set: its name, one-row kernels and register-blocked kernels.
pub(super) struct Set {
    /// Instruction-set name reported by `Kernels::name`.
    pub name: &'static str,
    /// One weight row · one activation row.
    pub dots: Vec<(GgmlDType, VecDotFn)>,
    /// Packed four-row weight tiles · four or one activation rows, lane for lane the same
    /// arithmetic in both, so a pair's result does not depend on which kernel computed it.
    pub tiled: Vec<(GgmlDType, Tiled)>,
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
                    tiled: if $x4x4 {
                        vec![
                            (
                                GgmlDType::Q4_1,
                                Tiled {
                                    pack: q4_1_pack,
                                    k44: q4_1_dot4x4,
                                    k41: q4_1_dot4x1,
                                },
                            ),
                            (
                                GgmlDType::Q8_0,
                                Tiled {
                                    pack: q8_0_pack,
                                    k44: q8_0_dot4x4,
                                    k41: q8_0_dot4x1,
                                },
                            ),
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

            /// Safe tile-packing wrapper: checks the four rows and the tile.
            macro_rules! wrapper_pack {
                ($name_:ident, $imp:ident, $wt:expr) => {
                    fn $name_(n: usize, w: [&[u8]; 4], tile: &mut [u8]) {
                        let wt: GgmlDType = $wt;
                        assert!(
                            wt.row_bytes(n)
                                .is_some_and(|b| w.iter().all(|w| w.len() >= b))
                                && tile.len() >= n / 32 * TILE_BLOCK_BYTES,
                            "tile operand too short"
                        );
                        // SAFETY: as for the one-row wrapper.
                        unsafe { $imp(n, w.map(<[u8]>::as_ptr), tile.as_mut_ptr()) }
                    }
                };
            }

            /// Safe 4x4 wrapper: checks the tile, the four rows and their scales.
            macro_rules! wrapper4x4 {
                ($name_:ident, $imp:ident, $at:expr) => {
                    fn $name_(
                        n: usize,
                        tile: &[u8],
                        a: [&[u8]; 4],
                        s: [&[f32]; 4],
                    ) -> [[f32; 4]; 4] {
                        let at: GgmlDType = $at;
                        assert!(
                            n % 32 == 0
                                && tile.len() >= n / 32 * TILE_BLOCK_BYTES
                                && at
                                    .row_bytes(n)
                                    .is_some_and(|b| a.iter().all(|a| a.len() >= b))
                                && s.iter().all(|s| s.len() >= n / 16),
                            "vec-dot operand too short"
                        );
                        // SAFETY: as for the one-row wrapper.
                        unsafe {
                            $imp::<4>(
                                n,
                                tile.as_ptr(),
                                a.map(<[u8]>::as_ptr),
                                s.map(<[f32]>::as_ptr),
                            )
                        }
                    }
                };
            }

            /// Safe 4x1 wrapper: the 4x4 body with one activation row.
            macro_rules! wrapper4x1 {
                ($name_:ident, $imp:ident, $at:expr) => {
                    fn $name_(n: usize, tile: &[u8], a: &[u8], s: &[f32]) -> [f32; 4] {
                        let at: GgmlDType = $at;
                        assert!(
                            n % 32 == 0
                                && tile.len() >= n / 32 * TILE_BLOCK_BYTES
                                && at.row_bytes(n).is_some_and(|b| a.len() >= b)
                                && s.len() >= n / 16,
                            "vec-dot operand too short"
                        );
                        // SAFETY: as for the one-row wrapper.
                        let [col] =
                            unsafe { $imp::<1>(n, tile.as_ptr(), [a.as_ptr()], [s.as_ptr()]) };
                        col
                    }
                };
            }

            wrapper!(q4_0_dot, q4_0_impl, GgmlDType::Q4_0, GgmlDType::Q8_0);
            wrapper!(q4_1_dot, q4_1_impl, GgmlDType::Q4_1, GgmlDType::Q8_1);
            wrapper!(q8_0_dot, q8_0_impl, GgmlDType::Q8_0, GgmlDType::Q8_0);
            wrapper_pack!(q4_1_pack, q4_1_pack_impl, GgmlDType::Q4_1);
            wrapper_pack!(q8_0_pack, q8_0_pack_impl, GgmlDType::Q8_0);
            wrapper4x4!(q4_1_dot4x4, q4_1_4x4_impl, GgmlDType::Q8_1);
            wrapper4x4!(q8_0_dot4x4, q8_0_4x4_impl, GgmlDType::Q8_0);
            wrapper4x1!(q4_1_dot4x1, q4_1_4x4_impl, GgmlDType::Q8_1);
            wrapper4x1!(q8_0_dot4x1, q8_0_4x4_impl, GgmlDType::Q8_0);

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

            /// [`nibbles`] with one shift: the 16 bytes broadcast to both halves, the upper
            /// half shifted right by four (bits crossing into a byte's high nibble are masked).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn nibbles2(p: *const u8) -> __m256i {
                // SAFETY: the caller guarantees 16 readable bytes at `p`.
                let t =
                    unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i)) };
                let shifted = _mm256_srlv_epi32(t, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
                _mm256_and_si256(shifted, _mm256_set1_epi8(0xF))
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

            /// Packs four Q4_1 rows: per block the 4 x 32 nibbles as bytes (ggml order), then
            /// `d0..d3`, `m0..m3` as f32.
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_pack_impl(n: usize, w: [*const u8; 4], tile: *mut u8) {
                let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
                // SAFETY (whole body): n/32 blocks of 20 bytes at each w[r]; the tile holds
                // n/32 blocks of TILE_BLOCK_BYTES.
                unsafe {
                    for i in 0..n / 32 {
                        let wb = w.map(|p| p.add(20 * i));
                        let tb = tile.add(TILE_BLOCK_BYTES * i);
                        for (r, p) in wb.iter().enumerate() {
                            _mm256_storeu_si256(tb.add(32 * r) as *mut __m256i, nibbles2(p.add(4)));
                        }
                        // [d0 m0 d1 m1 d2 m2 d3 m3] → [d0..d3 m0..m3].
                        let dm = _mm256_cvtph_ps(_mm_set_epi32(
                            rd32(wb[3]),
                            rd32(wb[2]),
                            rd32(wb[1]),
                            rd32(wb[0]),
                        ));
                        let dm = _mm256_permutevar8x32_ps(dm, order);
                        _mm256_storeu_ps(tb.add(128) as *mut f32, dm);
                    }
                }
            }

            /// Packs four Q8_0 rows: per block the 4 x 32 weights plus 128 as unsigned bytes,
            /// then `d0..d3` as f32 and four zeros.
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_pack_impl(n: usize, w: [*const u8; 4], tile: *mut u8) {
                let bias = _mm256_set1_epi8(-128);
                // SAFETY (whole body): n/32 blocks of 34 bytes at each w[r]; the tile holds
                // n/32 blocks of TILE_BLOCK_BYTES.
                unsafe {
                    for i in 0..n / 32 {
                        let wb = w.map(|p| p.add(34 * i));
                        let tb = tile.add(TILE_BLOCK_BYTES * i);
                        for (r, p) in wb.iter().enumerate() {
                            // w xor 0x80 is w + 128 as u8.
                            let u = _mm256_xor_si256(ld256(p.add(2)), bias);
                            _mm256_storeu_si256(tb.add(32 * r) as *mut __m256i, u);
                        }
                        let d = _mm_setr_ps(h2f(wb[0]), h2f(wb[1]), h2f(wb[2]), h2f(wb[3]));
                        _mm256_storeu_ps(tb.add(128) as *mut f32, _mm256_castps128_ps256(d));
                        _mm_storeu_ps(tb.add(144) as *mut f32, _mm_setzero_ps());
                    }
                }
            }

            /// `d_r·d_a` (exact: two f16) of the tile block at `tb` for its four rows and
            /// block `i` of each activation row, into `out[c][r]`. They stay in memory so that
            /// [`fma_scaled`] reads each with a broadcast load (the load ports are idle), not a
            /// shuffle on the vector ports.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn tile_scales<const C: usize>(
                tb: *const u8,
                s: [*const f32; C],
                i: usize,
                out: &mut [[f32; 4]; C],
            ) {
                // SAFETY: the caller guarantees a tile block at `tb` and block `i`'s two f32
                // at each s[c].
                unsafe {
                    let d = _mm_loadu_ps(tb.add(128) as *const f32);
                    for (c, sc) in out.iter_mut().enumerate() {
                        let da = _mm_set1_ps(*s[c].add(2 * i));
                        _mm_storeu_ps(sc.as_mut_ptr(), _mm_mul_ps(d, da));
                    }
                }
            }

            /// `acc + scale·p` lane by lane, `scale` read by a load of its own.
            #[inline]
            #[target_feature(enable = $feat)]
            fn fma_scaled(acc: __m256, scale: &f32, p: __m256) -> __m256 {
                // SAFETY: `scale` is a reference, valid to read.
                let sr = _mm256_set1_ps(unsafe { std::ptr::read_volatile(scale) });
                _mm256_fmadd_ps(sr, p, acc)
            }

            /// A Q4_1 tile (four weight rows) × `C` Q8_1 activation rows; `out[c][r]` is
            /// `dot(w[r], a[c])`, with `s[c]` the activation blocks' `(d, s)` as f32 (see
            /// `activation_scales`). Every pair keeps ggml's arithmetic: eight i32 lanes of
            /// four products each, `acc = fma(d_w·d_a, lanes, acc)` block after block in its
            /// own accumulator (16 of them: this needs the 32 registers of AVX512VL), and
            /// `m_w·s_a` (exact: two f16) summed in order. The weights come unpacked and the
            /// scales as f32, so the loop is loads, `vpdpbusd`, convert and FMA (the 16 scales
            /// `d_w·d_a` from [`tile_scales`]).
            #[target_feature(enable = $feat)]
            unsafe fn q4_1_4x4_impl<const C: usize>(
                n: usize,
                tile: *const u8,
                a: [*const u8; C],
                s: [*const f32; C],
            ) -> [[f32; 4]; C] {
                let mut acc = [[_mm256_setzero_ps(); 4]; C];
                let mut mins = [_mm_setzero_ps(); C];
                let mut scales = [[0f32; 4]; C];
                let z = _mm256_setzero_si256();
                // SAFETY (whole body): n/32 tile blocks, and n/32 blocks of 36 bytes at each
                // a[c] and two f32 at each s[c].
                unsafe {
                    for i in 0..n / 32 {
                        let tb = tile.add(TILE_BLOCK_BYTES * i);
                        let m = _mm_loadu_ps(tb.add(144) as *const f32);
                        tile_scales(tb, s, i, &mut scales);
                        let q = [0, 1, 2, 3].map(|r| ld256(tb.add(32 * r)));
                        for c in 0..C {
                            let y = ld256(a[c].add(36 * i + 4));
                            for r in 0..4 {
                                let p = _mm256_cvtepi32_ps(dp(z, q[r], y));
                                acc[c][r] = fma_scaled(acc[c][r], &scales[c][r], p);
                            }
                            let sa = _mm_set1_ps(*s[c].add(2 * i + 1));
                            mins[c] = _mm_fmadd_ps(m, sa, mins[c]);
                        }
                    }
                }
                finish4x4(acc, mins)
            }

            /// A Q8_0 tile (four weight rows) × `C` Q8_0 activation rows; `out[c][r]` is
            /// `dot(w[r], a[c])`, each pair in ggml's arithmetic (as for Q4_1). Uses
            /// `(w + 128)·y − 128·Σy` (the same i32 lanes as ggml's signed products): the
            /// tile holds the unsigned weights, and `−128·Σy` is made once per activation
            /// block (as the accumulator input), so each pair's integer part is one
            /// `vpdpbusd`.
            #[target_feature(enable = $feat)]
            unsafe fn q8_0_4x4_impl<const C: usize>(
                n: usize,
                tile: *const u8,
                a: [*const u8; C],
                s: [*const f32; C],
            ) -> [[f32; 4]; C] {
                let mut acc = [[_mm256_setzero_ps(); 4]; C];
                let mut scales = [[0f32; 4]; C];
                let bias = _mm256_set1_epi8(-128);
                let z = _mm256_setzero_si256();
                // SAFETY (whole body): n/32 tile blocks, and n/32 blocks of 34 bytes at each
                // a[c] and two f32 at each s[c].
                unsafe {
                    for i in 0..n / 32 {
                        let tb = tile.add(TILE_BLOCK_BYTES * i);
                        tile_scales(tb, s, i, &mut scales);
                        let u = [0, 1, 2, 3].map(|r| ld256(tb.add(32 * r)));
                        for c in 0..C {
                            let y = ld256(a[c].add(34 * i + 2));
                            // 0x80 as the unsigned operand: lanes of 128·Σy, negated.
                            let corr = _mm256_sub_epi32(z, dp(z, bias, y));
                            for r in 0..4 {
                                let p = _mm256_cvtepi32_ps(dp(corr, u[r], y));
                                acc[c][r] = fma_scaled(acc[c][r], &scales[c][r], p);
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
