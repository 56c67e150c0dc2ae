//! llama.cpp's arithmetic for the steps around the quantized matmuls, bit for bit: what the
//! forward uses with quantized weights and int8 activations, so that it computes llama.cpp's
//! numbers and not merely numbers as close to them as `transformers`' are.
//!
//! Q8 rounding of every matmul input makes this model chaotic at the ulp level: a one-ulp change
//! in attention flips a rounding a few layers later and moves log-probs by 0.05. So "close" is
//! not enough, and every step here repeats what ggml's CPU backend does, as
//! `scripts/oracle/ggml_arithmetic.py` verifies against llama.cpp's own tensors:
//!
//! * RMSNorm sums the f32 squares in f64, in order.
//! * Rotary tables hold f32 angles grown by repeated multiplication, rotated with one fma.
//! * Queries, keys, values and attention weights are rounded to f16 (llama.cpp's KV cache and
//!   its f16 attention matmuls).
//! * Attention dot products add as llama.cpp's x86 kernels with 16-lane (AVX-512) registers do:
//!   when a sequence runs two or more new tokens, as llamafile's tinyBLAS (one 16-lane
//!   accumulator); for one token, as `ggml_vec_dot_f16` (four 16-lane accumulators over steps
//!   of 64). [`Order`] names the two.
//! * Soft-max and SiLU use ggml's `ggml_v_expf` polynomial, and soft-max sums each 16 values with
//!   `_mm512_reduce_add_ps`'s tree into an f64.
//!
//! Those are the numbers of a llama.cpp built for AVX-512 (an AVX2-only build adds in 8 lanes
//! and differs). Here they are emulated lane for lane, with AVX2 where the CPU has it and in
//! portable code elsewhere, and both give the same bits.

use std::cell::RefCell;

use crate::quant::f16_round;

/// Whether a model with `weights` runs in llama.cpp's arithmetic: quantized weights multiplied
/// with int8 activations (the matmuls are then llama.cpp's, and so is everything around them).
pub fn uses_ggml_arithmetic(weights: &super::ModelWeights) -> bool {
    weights.layers.first().is_some_and(|l| {
        l.o.weight.dtype().block_size() > 1
            && l.o.weight.activations() == crate::quant::Activations::Int8
    })
}

/// How an attention dot product adds up (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// llamafile tinyBLAS: one 16-lane accumulator (a sequence's step of two or more tokens).
    Tiled,
    /// `ggml_vec_dot_f16`: four 16-lane accumulators over steps of 64 (a one-token step).
    Vec,
}

impl Order {
    /// The order llama.cpp uses for a sequence running `new_tokens` tokens in a step.
    pub(crate) fn for_step(new_tokens: usize) -> Self {
        if new_tokens >= 2 {
            Order::Tiled
        } else {
            Order::Vec
        }
    }
}

/// Rounds every value to f16 in place.
pub(crate) fn f16_round_all(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2/FMA/F16C were detected.
        unsafe { x86::f16_round_all(x) };
        return;
    }
    for v in x {
        *v = f16_round(*v);
    }
}

/// RMSNorm of each row of `x` (width `w.len()`) into `out`: ggml sums the squares in f64.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, dst) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut sum = 0f64;
        for v in row {
            sum += (v * v) as f64;
        }
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for i in 0..n {
            dst[i] = row[i] * scale * w[i];
        }
    }
}

/// Rotary cos/sin of one position as ggml computes them: θ = pos, then θ ·= base^(-2/dims)
/// from pair to pair, all in f32.
pub(crate) fn rope_angles(theta_base: f32, half: usize, pos: usize) -> (Vec<f32>, Vec<f32>) {
    let scale = theta_base.powf(-2.0 / (2 * half) as f32);
    let mut theta = pos as f32;
    let (mut cos, mut sin) = (Vec::with_capacity(half), Vec::with_capacity(half));
    for _ in 0..half {
        cos.push(theta.cos());
        sin.push(theta.sin());
        theta *= scale;
    }
    (cos, sin)
}

/// [`rope_angles`] of positions `0..positions`, position-major.
pub(crate) fn rope_tables(theta_base: f32, half: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..positions {
        let (c, s) = rope_angles(theta_base, half, p);
        cos.extend(c);
        sin.extend(s);
    }
    (cos, sin)
}

/// ggml's rotation of one pair: `(a·c − b·s, a·s + b·c)` with the first product fused.
#[inline]
pub(crate) fn rotate(a: f32, b: f32, c: f32, s: f32) -> (f32, f32) {
    (a.mul_add(c, -(b * s)), a.mul_add(s, b * c))
}

/// The sum of 16 lanes in `_mm512_reduce_add_ps`'s order (GCC): halves of 256, of 128, then
/// `[2, 3] + [0, 1]` and lane 0 + lane 1.
#[inline]
fn reduce16(l: &[f32; 16]) -> f32 {
    let mut t8 = [0f32; 8];
    for i in 0..8 {
        t8[i] = l[8 + i] + l[i];
    }
    let mut t4 = [0f32; 4];
    for i in 0..4 {
        t4[i] = t8[4 + i] + t8[i];
    }
    (t4[2] + t4[0]) + (t4[3] + t4[1])
}

/// `a · b` in `order` (portable).
fn dot_portable(a: &[f32], b: &[f32], order: Order) -> f32 {
    let n = a.len();
    match order {
        Order::Tiled if n.is_multiple_of(16) => {
            let mut acc = [0f32; 16];
            for (a, b) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
                for (l, acc) in acc.iter_mut().enumerate() {
                    *acc = a[l].mul_add(b[l], *acc);
                }
            }
            reduce16(&acc)
        }
        // tinyBLAS takes only lengths that are a multiple of 16; ggml falls back to vec_dot.
        _ => {
            let mut acc = [[0f32; 16]; 4];
            let whole = n - n % 64;
            for k in (0..whole).step_by(64) {
                for (j, acc) in acc.iter_mut().enumerate() {
                    for (l, acc) in acc.iter_mut().enumerate() {
                        let i = k + 16 * j + l;
                        *acc = a[i].mul_add(b[i], *acc);
                    }
                }
            }
            let mut s = [0f32; 16];
            for l in 0..16 {
                s[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
            }
            let mut sum = reduce16(&s) as f64;
            for i in whole..n {
                sum += (a[i] * b[i]) as f64;
            }
            sum as f32
        }
    }
}

/// ggml's order of one head's elements: our rotary layout keeps a head's pair `i` at `i` and
/// `half + i` (rotate-half, as `transformers`), llama.cpp's at `2i` and `2i + 1`, and the dot
/// product adds its lanes in llama.cpp's order.
fn interleaved(x: &[f32]) -> Vec<f32> {
    let half = x.len() / 2;
    (0..x.len()).map(|e| x[e / 2 + (e % 2) * half]).collect()
}

/// `out[j] = q · m[j·stride ..][.. q.len()]` for every `j`: rotated queries and keys of one
/// head in our rotary layout, multiplied in llama.cpp's element order and in `order`.
pub(crate) fn dot_rows(out: &mut [f32], q: &[f32], m: &[f32], stride: usize, order: Order) {
    let hd = q.len();
    #[cfg(target_arch = "x86_64")]
    if x86::available() && hd.is_multiple_of(64) {
        for (j, o) in out.iter_mut().enumerate() {
            let row = &m[j * stride..j * stride + hd];
            // SAFETY: AVX2/FMA/F16C were detected; both slices hold `hd` values.
            *o = unsafe { x86::dot_pairs(q, row, order) };
        }
        return;
    }
    let qi = interleaved(q);
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_portable(&qi, &interleaved(&m[j * stride..j * stride + hd]), order);
    }
}

thread_local! {
    /// Per-lane accumulators of `weighted_rows` (up to 64 lanes × head_dim), then 16 folded
    /// lanes and a row of zeros.
    static LANES: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst[d] = Σ_j w[j] · m[j·stride + d]` (attention weights times values) with the lane
/// structure of `order` along `j`: lane `j mod 16` (tiled) or `j mod 64` (vec), summed as that
/// kernel sums its lanes. Lanes no `j` reaches hold zeros in the kernel; here they are never
/// written, and the sums read zeros for them.
pub(crate) fn weighted_rows(dst: &mut [f32], w: &[f32], m: &[f32], stride: usize, order: Order) {
    let hd = dst.len();
    let lanes = match order {
        Order::Tiled => 16,
        Order::Vec => 64,
    };
    let used = w.len().min(lanes);
    LANES.with(|cell| {
        let (acc, folded) = &mut *cell.borrow_mut();
        acc.resize(used * hd, 0.0);
        for (j, &wj) in w.iter().enumerate() {
            let lane = &mut acc[(j % lanes) * hd..][..hd];
            let row = &m[j * stride..j * stride + hd];
            if j < lanes {
                // The kernel's first fma into a zero lane: one rounding of the product, and
                // `+ 0.0` gives the sign of zero that fma(w, v, +0) gives.
                for (a, &v) in lane.iter_mut().zip(row) {
                    *a = wj * v + 0.0;
                }
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if x86::available() && hd.is_multiple_of(8) {
                // SAFETY: AVX2/FMA were detected; `lane` and the row hold `hd` values.
                unsafe { x86::axpy(lane, wj, row) };
                continue;
            }
            for (a, &v) in lane.iter_mut().zip(row) {
                *a = wj.mul_add(v, *a);
            }
        }
        // The 16 folded rows are overwritten whole; only the row of zeros needs writing.
        folded.resize(17 * hd, 0.0);
        let (folded, zeros) = folded.split_at_mut(16 * hd);
        zeros.fill(0.0);
        lane_sums(acc, used, lanes, zeros, folded, dst);
    });
}

/// The per-lane rows of `weighted_rows` (`used` of `lanes` written, the rest zero) summed in
/// the kernel's order, element by element: 64 lanes fold to 16 as `vec_dot_f16` adds its
/// four accumulators, then `reduce16`'s tree. Row operations, so they vectorise.
fn lane_sums(
    acc: &[f32],
    used: usize,
    lanes: usize,
    zeros: &[f32],
    folded: &mut [f32],
    dst: &mut [f32],
) {
    let hd = dst.len();
    let lane = |l: usize| {
        if l < used {
            &acc[l * hd..][..hd]
        } else {
            zeros
        }
    };
    for (l, out) in folded.chunks_exact_mut(hd).enumerate() {
        if lanes == 16 {
            out.copy_from_slice(lane(l));
            continue;
        }
        let (a, b, c, e) = (lane(l), lane(32 + l), lane(16 + l), lane(48 + l));
        for d in 0..hd {
            out[d] = (a[d] + b[d]) + (c[d] + e[d]);
        }
    }
    // reduce16 on rows: 16 → 8 → 4 (`t[i] = t[half + i] + t[i]`), then (2 + 0) + (3 + 1).
    for half in [8, 4] {
        let (lo, hi) = folded[..2 * half * hd].split_at_mut(half * hd);
        for (x, &y) in lo.iter_mut().zip(hi.iter()) {
            *x += y;
        }
    }
    let t = |i: usize| &folded[i * hd..][..hd];
    for (d, out) in dst.iter_mut().enumerate() {
        *out = (t(2)[d] + t(0)[d]) + (t(3)[d] + t(1)[d]);
    }
}

const EXP_R: f32 = 12582912.0; // 0x1.8p23
const EXP_LOG2E: f32 = f32::from_bits(0x3fb8aa3b); // 0x1.715476p+0
const EXP_LN2_HI: f32 = f32::from_bits(0x3f317200); // 0x1.62e4p-1
const EXP_LN2_LO: f32 = f32::from_bits(0x35bfbe8e); // 0x1.7f7d1cp-20
const EXP_C: [f32; 5] = [
    f32::from_bits(0x3f7ffff6), // 0x1.ffffecp-1
    f32::from_bits(0x3efffedb), // 0x1.fffdb6p-2
    f32::from_bits(0x3e2aaf33), // 0x1.555e66p-3
    f32::from_bits(0x3d2b9f17), // 0x1.573e2ep-5
    f32::from_bits(0x3c072010), // 0x1.0e4020p-7
];

/// ggml's AVX-512 `ggml_v_expf` for one value.
#[inline]
pub(crate) fn v_expf(x: f32) -> f32 {
    let n = x.mul_add(EXP_LOG2E, EXP_R) - EXP_R;
    if n.is_nan() {
        return n;
    }
    if n.abs() > 192.0 {
        // ggml's special cases: overflow to infinity, underflow to zero.
        return if n > 0.0 { f32::INFINITY } else { 0.0 };
    }
    let b = (-n).mul_add(EXP_LN2_LO, (-n).mul_add(EXP_LN2_HI, x));
    let u = b * b;
    let j = EXP_C[4]
        .mul_add(b, EXP_C[3])
        .mul_add(u, EXP_C[2].mul_add(b, EXP_C[1]))
        .mul_add(u, EXP_C[0].mul_add(b, 1.0));
    // `_mm512_scalef_ps(j, n)`: j·2ⁿ rounded once (exact in f64 for |n| <= 192).
    (j as f64 * (n as f64).exp2()) as f32
}

/// Soft-max in place of the (already scaled) scores `s`, as ggml: e = v_expf(s − max), the sum
/// of `reduce16` of each 16 values (counted from the first) in f64, e · f32(1/sum), then the
/// weights rounded to f16 for the f16 matmul with the values.
pub(crate) fn soft_max_f16(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for chunk in s.chunks_mut(16) {
        exp_shifted(chunk, max);
        let mut l = [0f32; 16];
        l[..chunk.len()].copy_from_slice(chunk);
        sum += reduce16(&l) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in s.iter_mut() {
        *v *= inv;
    }
    f16_round_all(s);
}

/// `x = v_expf(x − max)` in place.
fn exp_shifted(x: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: AVX2/FMA/F16C were detected.
        unsafe { x86::exp_shifted(x, max) };
        return;
    }
    for v in x {
        *v = v_expf(*v - max);
    }
}

/// `out[i] = silu(g[i]) · u[i]` as `ggml_vec_swiglu_f32`: `x / (1 + v_expf(−x))` on each whole
/// 16 values, the C library's `expf` on the rest.
pub(crate) fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    let whole = g.len() - g.len() % 16;
    #[cfg(target_arch = "x86_64")]
    let done = if x86::available() {
        // SAFETY: AVX2/FMA were detected; all three slices hold at least `whole` values.
        unsafe { x86::swiglu(&g[..whole], &u[..whole], &mut out[..whole]) };
        whole
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for i in done..whole {
        out[i] = g[i] / (1.0 + v_expf(-g[i])) * u[i];
    }
    for i in whole..g.len() {
        out[i] = g[i] / (1.0 + (-g[i]).exp()) * u[i];
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// AVX2, FMA and F16C, detected once.
    pub fn available() -> bool {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var_os("PREFIX_RFT_QUANT_SCALAR").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f16_round_all(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds 8 f32.
            unsafe {
                let v = _mm256_loadu_ps(c.as_ptr());
                let h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for v in chunks.into_remainder() {
            *v = f16_round(*v);
        }
    }

    /// `a · b` in `order` for one head in our rotary layout (pair `i` at `i` and `half + i`)
    /// with llama.cpp's interleaved lanes (pair `i` at `2i`, `2i + 1`); length a multiple of 64.
    ///
    /// ggml's 16 lanes of a block of 16 elements are pairs `8c..8c + 8`, lows in the even lanes
    /// and highs in the odd ones: here the lows of those pairs are one 8-lane register and the
    /// highs another, loaded contiguously, and the final lane tree is done on them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_pairs(a: &[f32], b: &[f32], order: Order) -> f32 {
        let n = a.len();
        let half = n / 2;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY (whole body): both slices hold n values, n a multiple of 64.
        unsafe {
            let ld = |p: *const f32, i: usize| _mm256_loadu_ps(p.add(i));
            // `lo[m]`, `hi[m]`: ggml lanes 2m and 2m + 1.
            let (lo, hi) = match order {
                Order::Tiled => {
                    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for c in (0..half).step_by(8) {
                        lo = _mm256_fmadd_ps(ld(pa, c), ld(pb, c), lo);
                        hi = _mm256_fmadd_ps(ld(pa, half + c), ld(pb, half + c), hi);
                    }
                    (lo, hi)
                }
                Order::Vec => {
                    let mut lo = [_mm256_setzero_ps(); 4];
                    let mut hi = [_mm256_setzero_ps(); 4];
                    for s in (0..half).step_by(32) {
                        for j in 0..4 {
                            let c = s + 8 * j;
                            lo[j] = _mm256_fmadd_ps(ld(pa, c), ld(pb, c), lo[j]);
                            hi[j] = _mm256_fmadd_ps(ld(pa, half + c), ld(pb, half + c), hi[j]);
                        }
                    }
                    (
                        _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3])),
                        _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3])),
                    )
                }
            };
            // reduce16 on interleaved lanes: t8 = L[8 + i] + L[i] is lo/hi[4 + m] + lo/hi[m].
            let tlo = _mm_add_ps(_mm256_extractf128_ps(lo, 1), _mm256_castps256_ps128(lo));
            let thi = _mm_add_ps(_mm256_extractf128_ps(hi, 1), _mm256_castps256_ps128(hi));
            let (mut l, mut h) = ([0f32; 4], [0f32; 4]);
            _mm_storeu_ps(l.as_mut_ptr(), tlo);
            _mm_storeu_ps(h.as_mut_ptr(), thi);
            // t4 = [t8[4] + t8[0], t8[5] + t8[1], t8[6] + t8[2], t8[7] + t8[3]].
            let t4 = [l[2] + l[0], h[2] + h[0], l[3] + l[1], h[3] + h[1]];
            (t4[2] + t4[0]) + (t4[3] + t4[1])
        }
    }

    /// `dst += w · src`, one fma per element.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy(dst: &mut [f32], w: f32, src: &[f32]) {
        let wv = _mm256_set1_ps(w);
        for (d, s) in dst.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
            // SAFETY: both chunks hold 8 f32.
            unsafe {
                let v =
                    _mm256_fmadd_ps(wv, _mm256_loadu_ps(s.as_ptr()), _mm256_loadu_ps(d.as_ptr()));
                _mm256_storeu_ps(d.as_mut_ptr(), v);
            }
        }
    }

    /// `v_expf` of 8 lanes; lanes past the polynomial's range take the scalar path.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn v_expf8(x: __m256) -> __m256 {
        let r = _mm256_set1_ps(EXP_R);
        let n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(EXP_LOG2E), r), r);
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(EXP_LN2_LO),
            _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x),
        );
        let u = _mm256_mul_ps(b, b);
        let c = |i: usize| _mm256_set1_ps(EXP_C[i]);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(c(4), b, c(3)),
                u,
                _mm256_fmadd_ps(c(2), b, c(1)),
            ),
            u,
            _mm256_fmadd_ps(c(0), b, _mm256_set1_ps(1.0)),
        );
        // 2ⁿ is a normal f32 for -126 <= n <= 127; then j·2ⁿ is scalef's single rounding.
        let inside = _mm256_and_ps(
            _mm256_cmp_ps(n, _mm256_set1_ps(-126.0), _CMP_GE_OQ),
            _mm256_cmp_ps(n, _mm256_set1_ps(127.0), _CMP_LE_OQ),
        );
        if _mm256_movemask_ps(inside) == 0xFF {
            let e = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            return _mm256_mul_ps(j, _mm256_castsi256_ps(e));
        }
        let mut v = [0f32; 8];
        // SAFETY: `v` holds 8 f32.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), x) };
        for x in &mut v {
            *x = v_expf(*x);
        }
        // SAFETY: as above.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// `x = v_expf(x − max)` in place.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn exp_shifted(x: &mut [f32], max: f32) {
        let m = _mm256_set1_ps(max);
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds 8 f32.
            unsafe {
                let v = v_expf8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
            }
        }
        for v in chunks.into_remainder() {
            *v = v_expf(*v - max);
        }
    }

    /// `out = g / (1 + v_expf(−g)) · u`; lengths a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        for ((g, u), o) in g
            .chunks_exact(8)
            .zip(u.chunks_exact(8))
            .zip(out.chunks_exact_mut(8))
        {
            // SAFETY: each chunk holds 8 f32.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr());
                let e = v_expf8(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
                _mm256_storeu_ps(
                    o.as_mut_ptr(),
                    _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr())),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    #[test]
    fn exp_constants_are_ggmls_hex_floats() {
        let hex = |m: f64, e: i32| (m * 2f64.powi(e)) as f32;
        assert_eq!(EXP_LOG2E, hex(0x1715476 as f64 / 16777216.0, 0));
        assert_eq!(EXP_LN2_HI, hex(0x162e4 as f64 / 65536.0, -1));
        assert_eq!(EXP_LN2_LO, hex(0x17f7d1c as f64 / 16777216.0, -20));
        assert_eq!(EXP_C[0], hex(0x1ffffec as f64 / 16777216.0, -1));
        assert_eq!(EXP_C[1], hex(0x1fffdb6 as f64 / 16777216.0, -2));
        assert_eq!(EXP_C[2], hex(0x1555e66 as f64 / 16777216.0, -3));
        assert_eq!(EXP_C[3], hex(0x1573e2e as f64 / 16777216.0, -5));
        assert_eq!(EXP_C[4], hex(0x10e4020 as f64 / 16777216.0, -7));
    }

    #[test]
    fn v_expf_is_within_two_ulps_of_exp_and_handles_the_range_ends() {
        for x in data(10_000, 1, 80.0) {
            let (got, want) = (v_expf(x), (x as f64).exp() as f32);
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "{x}: {got} vs {want}");
        }
        assert_eq!(v_expf(-1000.0), 0.0);
        assert_eq!(v_expf(1000.0), f32::INFINITY);
        assert_eq!(v_expf(0.0), 1.0);
        assert!(v_expf(-100.0) >= 0.0 && v_expf(-100.0) < 1e-40);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_give_the_portable_bits() {
        if !x86::available() {
            return;
        }
        for (seed, n) in [(1u64, 64usize), (2, 128), (3, 192)] {
            let (a, b) = (data(n, seed, 3.0), data(n, seed + 10, 3.0));
            for order in [Order::Tiled, Order::Vec] {
                // SAFETY: available() checked above.
                let simd = unsafe { x86::dot_pairs(&a, &b, order) };
                let want = dot_portable(&interleaved(&a), &interleaved(&b), order);
                assert_eq!(simd.to_bits(), want.to_bits(), "{order:?} {n}");
            }
        }
        let x = data(1000, 4, 120.0);
        let mut simd = x.clone();
        // SAFETY: as above.
        unsafe { x86::exp_shifted(&mut simd, 3.0) };
        for (s, v) in simd.iter().zip(&x) {
            assert_eq!(s.to_bits(), v_expf(v - 3.0).to_bits(), "{v}");
        }
        let (g, u) = (data(512, 5, 30.0), data(512, 6, 2.0));
        let mut simd = vec![0f32; 512];
        // SAFETY: as above.
        unsafe { x86::swiglu(&g, &u, &mut simd) };
        for i in 0..512 {
            let want = g[i] / (1.0 + v_expf(-g[i])) * u[i];
            assert_eq!(simd[i].to_bits(), want.to_bits());
        }
        let mut r = data(999, 7, 70000.0);
        let want: Vec<f32> = r.iter().map(|&v| f16_round(v)).collect();
        // SAFETY: as above.
        unsafe { x86::f16_round_all(&mut r) };
        assert_eq!(r, want);
    }

    #[test]
    fn weighted_rows_add_lanes_in_the_kernel_order() {
        // 70 rows of 64: the vec order's 64 lanes wrap around once; 20 and 5 leave lanes
        // unwritten (zero in the kernel).
        for rows in [5, 20, 70] {
            let hd = 64;
            let m = data(rows * hd, 8, 1.0);
            let w: Vec<f32> = data(rows, 9, 1.0)
                .iter()
                .map(|v| f16_round(v.abs()))
                .collect();
            for order in [Order::Tiled, Order::Vec] {
                let mut got = vec![0f32; hd];
                weighted_rows(&mut got, &w, &m, hd, order);
                for d in 0..hd {
                    let col: Vec<f32> = (0..rows).map(|j| m[j * hd + d]).collect();
                    let mut wp = w.clone();
                    let mut cp = col.clone();
                    // The same sum as a dot product of the padded column with the weights.
                    let pad = if order == Order::Tiled { 16 } else { 64 };
                    while !wp.len().is_multiple_of(pad) {
                        wp.push(0.0);
                        cp.push(0.0);
                    }
                    let want = dot_portable(&wp, &cp, order);
                    assert_eq!(got[d].to_bits(), want.to_bits(), "{order:?} {d}");
                }
            }
        }
    }

    #[test]
    fn soft_max_sums_to_one_and_rounds_to_f16() {
        let mut s = data(37, 10, 5.0);
        soft_max_f16(&mut s);
        let total: f32 = s.iter().sum();
        assert!((total - 1.0).abs() < 1e-2, "{total}");
        assert!(s.iter().all(|&v| v == f16_round(v) && v >= 0.0));
    }

    #[test]
    fn rope_tables_grow_the_angle_in_f32() {
        let (cos, sin) = rope_tables(10000.0, 4, 3);
        assert_eq!(cos[0], 1.0);
        assert_eq!(sin[4], 1f32.sin());
        let scale = 10000f32.powf(-0.25);
        assert_eq!(cos[4 + 2], (scale * scale).cos());
        assert_eq!(sin[8 + 3], (2.0 * scale * scale * scale).sin());
    }
}
