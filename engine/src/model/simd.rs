//! Small vector kernels of attention and the LoRA delta (dot products, a matrix-vector
//! product, softmax), compiled for AVX2+FMA and chosen at run time so a portable build still
//! runs them vectorised; the portable versions are the fallback elsewhere and the reference in
//! tests.

use std::sync::OnceLock;

use crate::quant::{q8_amax, q8_round};

/// `dst += wᵀ · q` over 8-bit rows (see [`Kernels::gemv_t_q8`]).
pub(crate) type GemvQ8 = fn(&mut [f32], &[f32], &[i8], &[f32]);

/// Vector kernels selected once for this CPU.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    /// Dot product of two equal-length slices.
    pub dot: fn(&[f32], &[f32]) -> f32,
    /// `dst[j] += Σ_i w[i] · m[i · stride + j]`: a row vector times a `w.len() × dst.len()`
    /// matrix whose rows start `stride` apart, added to `dst` (`m` must reach the last row's
    /// end).
    pub gemv_t: fn(&mut [f32], &[f32], &[f32], usize),
    /// `out[j] = q · m[j · stride ..][.. q.len()]` for every `j < out.len()`: one dot product
    /// per matrix row (rows `stride` apart), with the arithmetic of `dot`.
    pub dot_rows: fn(&mut [f32], &[f32], &[f32], usize),
    /// In place `x = exp(x - max)`, returning the sum of the results.
    pub exp_sum: fn(&mut [f32], f32) -> f32,
    /// `x · m` for a row `m` in 8-bit blocks ([`Q8Rows`]: value `q[i] · d[i / 32]`), as
    /// `Σ_b d[b] · Σ_{i ∈ b} x[i] · q[i]`: the scale multiplies a block's sum, not each value.
    pub dot_q8: fn(&[f32], &[i8], &[f32]) -> f32,
    /// `dst[j] += Σ_i (w[i] · d[i, j / 32]) · q[i, j]`, one fused multiply-add per row in row
    /// order: `gemv_t` over the 8-bit rows `q` (`w.len()` rows of `dst.len()` values, `d` their
    /// block scales row after row). The same bits on every CPU.
    pub gemv_t_q8: GemvQ8,
}

/// Values per 8-bit block of [`Q8Rows`].
pub(crate) const Q8_BLOCK: usize = 32;

/// A row-major matrix in 8-bit blocks: every row in blocks of [`Q8_BLOCK`] values (the last
/// block of a row may be shorter), each block with an f32 scale, value `q as f32 · d`. The
/// quantizer is the Q8 activation quantizer of the matmuls (scale `amax / 127`, ties to even).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Q8Rows {
    q: Vec<i8>,
    d: Vec<f32>,
    cols: usize,
}

impl Q8Rows {
    /// Quantizes `m`, rows of `cols` values.
    pub fn new(m: &[f32], cols: usize) -> Self {
        assert!(
            cols > 0 && m.len().is_multiple_of(cols),
            "Q8Rows: ragged matrix"
        );
        let mut q = vec![0i8; m.len()];
        let mut d = Vec::with_capacity(m.len() / cols * cols.div_ceil(Q8_BLOCK));
        for (row, qrow) in m.chunks_exact(cols).zip(q.chunks_exact_mut(cols)) {
            for (x, qb) in row.chunks(Q8_BLOCK).zip(qrow.chunks_mut(Q8_BLOCK)) {
                d.push(quantize_block(x, qb));
            }
        }
        Q8Rows { q, d, cols }
    }

    /// Row `r`: its 8-bit values and its block scales.
    pub fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let bpr = self.cols.div_ceil(Q8_BLOCK);
        (
            &self.q[r * self.cols..][..self.cols],
            &self.d[r * bpr..][..bpr],
        )
    }

    /// All values and all scales, rows in order.
    pub fn parts(&self) -> (&[i8], &[f32]) {
        (&self.q, &self.d)
    }

    /// The whole matrix as f32: what the 8-bit kernels compute with.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.q.len()];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            let (q, d) = self.row(r);
            dequantize(q, d, o);
        }
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() + self.d.len() * std::mem::size_of::<f32>()
    }
}

/// The activation quantizer's block arithmetic (`quant::q8_block`: scale `amax / 127`, values
/// `v · (127 / amax)` rounded half to even) into signed values.
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = q8_amax(x);
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = q8_round(v * id);
    }
    amax / 127.0
}

/// `out[i] = q[i] as f32 · d[i / 32]`: one row's values.
fn dequantize(q: &[i8], d: &[f32], out: &mut [f32]) {
    for ((o, q), &d) in out.chunks_mut(Q8_BLOCK).zip(q.chunks(Q8_BLOCK)).zip(d) {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = q as f32 * d;
        }
    }
}

/// The kernels for this CPU.
pub(crate) fn kernels() -> Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("PREFIX_RFT_QUANT_SCALAR").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Kernels {
                    dot: x86::dot,
                    gemv_t: x86::gemv_t,
                    dot_rows: x86::dot_rows,
                    exp_sum: x86::exp_sum,
                    dot_q8: x86::dot_q8,
                    gemv_t_q8: x86::gemv_t_q8,
                };
            }
        }
        Kernels {
            dot: portable::dot,
            gemv_t: portable::gemv_t,
            dot_rows: portable::dot_rows,
            exp_sum: portable::exp_sum,
            dot_q8: portable::dot_q8,
            gemv_t_q8: portable::gemv_t_q8,
        }
    })
}

pub(crate) mod portable {
    /// Dot product.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// `dst += w * src`.
    pub fn axpy(dst: &mut [f32], w: f32, src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += w * s;
        }
    }

    /// Whether rows `stride` apart, `rows` of them `width` wide, fit in `len` values.
    pub fn rows_fit(len: usize, rows: usize, width: usize, stride: usize) -> bool {
        rows == 0 || (rows - 1).saturating_mul(stride).saturating_add(width) <= len
    }

    /// `dst[j] += Σ_i w[i] · m[i · stride + j]`, one scaled row at a time (the order the
    /// vector version keeps for every element).
    pub fn gemv_t(dst: &mut [f32], w: &[f32], m: &[f32], stride: usize) {
        let n = dst.len();
        assert!(
            rows_fit(m.len(), w.len(), n, stride),
            "gemv_t: matrix too small"
        );
        for (i, &wi) in w.iter().enumerate() {
            axpy(dst, wi, &m[i * stride..i * stride + n]);
        }
    }

    /// One dot product per matrix row.
    pub fn dot_rows(out: &mut [f32], q: &[f32], m: &[f32], stride: usize) {
        assert!(
            rows_fit(m.len(), out.len(), q.len(), stride),
            "dot_rows: matrix too small"
        );
        for (j, o) in out.iter_mut().enumerate() {
            *o = dot(q, &m[j * stride..j * stride + q.len()]);
        }
    }

    /// Block sums scaled once each.
    pub fn dot_q8(x: &[f32], q: &[i8], d: &[f32]) -> f32 {
        let b = super::Q8_BLOCK;
        assert!(d.len() >= q.len().div_ceil(b), "dot_q8: scales missing");
        x.chunks(b)
            .zip(q.chunks(b))
            .zip(d)
            .map(|((x, q), &d)| d * x.iter().zip(q).map(|(x, &q)| x * q as f32).sum::<f32>())
            .sum()
    }

    /// Row by row, one fused multiply-add per element.
    pub fn gemv_t_q8(dst: &mut [f32], w: &[f32], q: &[i8], d: &[f32]) {
        let n = dst.len();
        let b = super::Q8_BLOCK;
        let bpr = n.div_ceil(b);
        assert!(
            q.len() >= w.len() * n && d.len() >= w.len() * bpr,
            "gemv_t_q8: matrix too small"
        );
        for (i, &wi) in w.iter().enumerate() {
            let row = &q[i * n..][..n];
            for ((out, q), &d) in dst.chunks_mut(b).zip(row.chunks(b)).zip(&d[i * bpr..]) {
                let c = wi * d;
                for (o, &q) in out.iter_mut().zip(q) {
                    *o = c.mul_add(q as f32, *o);
                }
            }
        }
    }

    /// `x = exp(x - max)` and the sum.
    pub fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only selected after `avx2` and `fma` were detected at run time.
        unsafe { dot_avx2(a, b) }
    }

    pub fn gemv_t(dst: &mut [f32], w: &[f32], m: &[f32], stride: usize) {
        let fits = super::portable::rows_fit(m.len(), w.len(), dst.len(), stride);
        assert!(fits, "gemv_t: matrix too small");
        // SAFETY: as above; the matrix size was checked.
        unsafe { gemv_t_avx2(dst, w, m, stride) }
    }

    pub fn dot_rows(out: &mut [f32], q: &[f32], m: &[f32], stride: usize) {
        let fits = super::portable::rows_fit(m.len(), out.len(), q.len(), stride);
        assert!(fits, "dot_rows: matrix too small");
        for (j, o) in out.iter_mut().enumerate() {
            // SAFETY: as above; every row is inside `m` (checked).
            *o = unsafe { dot_avx2(q, m.get_unchecked(j * stride..j * stride + q.len())) };
        }
    }

    pub fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        // SAFETY: as above.
        unsafe { exp_sum_avx2(x, max) }
    }

    pub fn dot_q8(x: &[f32], q: &[i8], d: &[f32]) -> f32 {
        let n = x.len().min(q.len());
        assert!(
            d.len() >= n.div_ceil(super::Q8_BLOCK),
            "dot_q8: scales missing"
        );
        // SAFETY: as above; every block of the first `n` values has its scale (checked).
        unsafe { dot_q8_avx2(&x[..n], &q[..n], d) }
    }

    pub fn gemv_t_q8(dst: &mut [f32], w: &[f32], q: &[i8], d: &[f32]) {
        let n = dst.len();
        let fits = q.len() >= w.len() * n && d.len() >= w.len() * n.div_ceil(super::Q8_BLOCK);
        assert!(fits, "gemv_t_q8: matrix too small");
        // SAFETY: as above; the matrix and its scales were checked.
        unsafe { gemv_t_q8_avx2(dst, w, q, d) }
    }

    /// 32 f32 at `p` in four registers.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load32(p: *const f32) -> [__m256; 4] {
        // SAFETY: the caller keeps `p..p + 32` inside its slice.
        unsafe { [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k))) }
    }

    /// `load32`'s inverse.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store32(p: *mut f32, v: [__m256; 4]) {
        for (k, v) in v.iter().enumerate() {
            // SAFETY: the caller keeps `p..p + 32` inside its slice.
            unsafe { _mm256_storeu_ps(p.add(8 * k), *v) };
        }
    }

    /// Eight 8-bit values at `p` as f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8x8(p: *const i8) -> __m256 {
        // SAFETY: the caller keeps `p..p + 8` inside its slice.
        let q = unsafe { _mm_loadl_epi64(p as *const __m128i) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }

    /// Each full block's `x · q` in two 8-lane halves, scaled into one of two accumulators
    /// (even and odd blocks); a short last block is summed in order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_q8_avx2(a: &[f32], q: &[i8], d: &[f32]) -> f32 {
        use super::Q8_BLOCK;
        let n = a.len();
        let full = n / Q8_BLOCK;
        let (pa, pq) = (a.as_ptr(), q.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        // SAFETY (all loads): block `b < full` covers `b·32 .. b·32 + 32 <= n` of both slices.
        for (b, &db) in d[..full].iter().enumerate() {
            let (x, y) = (pa.add(b * Q8_BLOCK), pq.add(b * Q8_BLOCK));
            let s0 = _mm256_mul_ps(_mm256_loadu_ps(x), q8x8(y));
            let s1 = _mm256_mul_ps(_mm256_loadu_ps(x.add(8)), q8x8(y.add(8)));
            let s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(16)), q8x8(y.add(16)), s0);
            let s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(24)), q8x8(y.add(24)), s1);
            let slot = &mut acc[b % 2];
            *slot = _mm256_fmadd_ps(_mm256_set1_ps(db), _mm256_add_ps(s0, s1), *slot);
        }
        let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
        let tail = full * Q8_BLOCK;
        if tail < n {
            let t: f32 = a[tail..]
                .iter()
                .zip(&q[tail..n])
                .map(|(x, &q)| x * q as f32)
                .sum();
            s += d[full] * t;
        }
        s
    }

    /// `gemv_t_avx2`'s tiles over 8-bit rows `n = dst.len()` wide: per row and 32-column tile
    /// (one block) the coefficient `w[i] · d`, then one fma per element; the columns past the
    /// last full tile take the portable kernel's identical scalar fmas.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemv_t_q8_avx2(dst: &mut [f32], w: &[f32], q: &[i8], d: &[f32]) {
        use super::Q8_BLOCK;
        let n = dst.len();
        let bpr = n.div_ceil(Q8_BLOCK);
        let (pd, pq) = (dst.as_mut_ptr(), q.as_ptr());
        let mut j = 0;
        // SAFETY (all loads and stores): `j + 32 <= n` keeps `dst` accesses in bounds, and `q`
        // holds `w.len()` rows of `n` values with `bpr` scales each in `d` (checked by the
        // caller). A tile starting at a multiple of 32 is one block.
        while j + Q8_BLOCK <= n {
            let mut acc = load32(pd.add(j));
            for (i, &wi) in w.iter().enumerate() {
                let c = _mm256_set1_ps(wi * *d.get_unchecked(i * bpr + j / Q8_BLOCK));
                let row = pq.add(i * n + j);
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(c, q8x8(row.add(8 * k)), *a);
                }
            }
            store32(pd.add(j), acc);
            j += Q8_BLOCK;
        }
        for jj in j..n {
            for (i, &wi) in w.iter().enumerate() {
                let c = wi * d[i * bpr + jj / Q8_BLOCK];
                dst[jj] = c.mul_add(q[i * n + jj] as f32, dst[jj]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY (all loads): `i + 16 <= n` / `i + 8 <= n` keep every load inside both slices.
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// Keeps 32 outputs in registers while it runs down the matrix's rows, so `dst` is read
    /// and written once instead of once per row; each element still sums in row order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gemv_t_avx2(dst: &mut [f32], w: &[f32], m: &[f32], stride: usize) {
        let n = dst.len();
        let (pd, pm) = (dst.as_mut_ptr(), m.as_ptr());
        let mut j = 0;
        // SAFETY (all loads and stores): `j + 32 <= n` / `j + 8 <= n` keep `dst` accesses in
        // bounds, and `m` reaches `(w.len() - 1) * stride + n` (checked by the caller), so row
        // `i`'s columns `j..j + 32` are inside it.
        while j + 32 <= n {
            let mut acc = load32(pd.add(j));
            for (i, &wi) in w.iter().enumerate() {
                let wv = _mm256_set1_ps(wi);
                let row = pm.add(i * stride + j);
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(row.add(8 * k)), *a);
                }
            }
            store32(pd.add(j), acc);
            j += 32;
        }
        while j + 8 <= n {
            let mut a = _mm256_loadu_ps(pd.add(j));
            for (i, &wi) in w.iter().enumerate() {
                a = _mm256_fmadd_ps(
                    _mm256_set1_ps(wi),
                    _mm256_loadu_ps(pm.add(i * stride + j)),
                    a,
                );
            }
            _mm256_storeu_ps(pd.add(j), a);
            j += 8;
        }
        while j < n {
            for (i, &wi) in w.iter().enumerate() {
                dst[j] += wi * m[i * stride + j];
            }
            j += 1;
        }
    }

    /// exp(x) for x <= 0 by range reduction to 2^k · e^r with a degree-6 polynomial on
    /// |r| <= ln2/2 (relative error below 2e-7, like Cephes' expf).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp256(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let k = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // r = x - k·ln2 in two steps for precision.
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(e, _mm256_castsi256_ps(bits))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_sum_avx2(x: &mut [f32], max: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: `i + 8 <= n` keeps loads and stores inside the slice.
        while i + 8 <= n {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            x[i] = (x[i] - max).exp();
            s += x[i];
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 100.0 - 10.0)
            .collect()
    }

    #[test]
    fn selected_kernels_match_portable_ones() {
        let k = kernels();
        for n in [0, 1, 7, 8, 9, 16, 63, 64, 65, 200] {
            let (a, b) = (data(n, 1), data(n, 2));
            let (d1, d2) = ((k.dot)(&a, &b), portable::dot(&a, &b));
            assert!(
                (d1 - d2).abs() <= 1e-4 * (1.0 + d2.abs()),
                "dot n={n}: {d1} vs {d2}"
            );
            for (rows, pad) in [(1, 0), (3, 0), (16, 0), (3, 5), (16, 64)] {
                let stride = n + pad;
                let (w, m) = (data(rows, 3), data((rows - 1) * stride + n, 4));
                let (mut g1, mut g2) = (a.clone(), a.clone());
                (k.gemv_t)(&mut g1, &w, &m, stride);
                portable::gemv_t(&mut g2, &w, &m, stride);
                // Both add the rows in the same order with fused multiply-adds on x86.
                for (p, q) in g1.iter().zip(&g2) {
                    assert!(
                        (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                        "gemv_t n={n}: {p} vs {q}"
                    );
                }
                let (mut d1, mut d2) = (vec![0f32; rows], vec![0f32; rows]);
                (k.dot_rows)(&mut d1, &a, &m, stride);
                portable::dot_rows(&mut d2, &a, &m, stride);
                for (j, (p, q)) in d1.iter().zip(&d2).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                        "dot_rows n={n}: {p} vs {q}"
                    );
                    // The same arithmetic as `dot` on that row.
                    assert_eq!(*p, (k.dot)(&a, &m[j * stride..j * stride + n]));
                }
            }
            let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (mut e1, mut e2) = (a.clone(), a.clone());
            let (s1, s2) = ((k.exp_sum)(&mut e1, max), portable::exp_sum(&mut e2, max));
            assert!(
                (s1 - s2).abs() <= 1e-5 * s2.max(1.0),
                "exp sum n={n}: {s1} vs {s2}"
            );
            for (p, q) in e1.iter().zip(&e2) {
                assert!(
                    (p - q).abs() <= 4e-7 * q.max(1e-30) + 1e-38,
                    "exp {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn q8_kernels_compute_with_the_dequantized_values() {
        let k = kernels();
        for n in [1, 7, 8, 16, 24, 32, 40, 64, 100, 576] {
            let x = data(n, 5);
            for rows in [1, 3, 16] {
                let m: Vec<f32> = data(rows * n, 6).iter().map(|v| v * 0.01).collect();
                let q8 = Q8Rows::new(&m, n);
                let deq = q8.dequantize();
                // Quantization error within half a step of each block's scale.
                for (r, (orig, back)) in m.chunks(n).zip(deq.chunks(n)).enumerate() {
                    let (_, d) = q8.row(r);
                    for (i, (a, b)) in orig.iter().zip(back).enumerate() {
                        assert!(
                            (a - b).abs() <= 0.5 * d[i / Q8_BLOCK] * 1.0001,
                            "{a} vs {b}"
                        );
                    }
                }
                let close = |p: f32, q: f32, what: &str| {
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                        "{what} n={n}: {p} vs {q}"
                    )
                };
                for r in 0..rows {
                    let (q, d) = q8.row(r);
                    let row = &deq[r * n..][..n];
                    close((k.dot_q8)(&x, q, d), portable::dot(&x, row), "dot_q8");
                    close(
                        portable::dot_q8(&x, q, d),
                        portable::dot(&x, row),
                        "portable dot_q8",
                    );
                }
                let w = data(rows, 7);
                let (q, d) = q8.parts();
                let (mut g1, mut g2, mut g3) = (x.clone(), x.clone(), x.clone());
                (k.gemv_t_q8)(&mut g1, &w, q, d);
                portable::gemv_t_q8(&mut g2, &w, q, d);
                portable::gemv_t(&mut g3, &w, &deq, n);
                // The vector and portable kernels fma in the same order: the same bits.
                assert_eq!(g1, g2, "gemv_t_q8 n={n} rows={rows}");
                for (p, q) in g1.iter().zip(&g3) {
                    close(*p, *q, "gemv_t_q8");
                }
            }
        }
        // The activation quantizer's values and scales.
        let m = data(100, 8);
        let q8 = Q8Rows::new(&m, 100);
        for (b, x) in m.chunks(Q8_BLOCK).enumerate() {
            let mut want = [0u8; Q8_BLOCK];
            let (d, _) = crate::quant::q8_block(x, &mut want[..x.len()]);
            let (q, ds) = q8.row(0);
            assert_eq!(ds[b], d);
            for (i, &w) in want[..x.len()].iter().enumerate() {
                assert_eq!(q[b * Q8_BLOCK + i], w as i8);
            }
        }
        // Zero blocks (a fresh LoRA's B) stay zero next to non-zero ones.
        let mut m = vec![0f32; 64];
        m[40] = 3.5;
        let back = Q8Rows::new(&m, 64).dequantize();
        assert!(back[..32].iter().chain(&back[41..]).all(|&v| v == 0.0) && back[40] > 3.49);
    }

    #[test]
    fn exp_underflows_to_zero_without_nan() {
        let mut x = vec![-1000.0f32, -90.0, -87.5, 0.0, -1e30, -1.0, -2.0, -3.0];
        let s = (kernels().exp_sum)(&mut x, 0.0);
        assert!(x.iter().all(|v| v.is_finite() && *v >= 0.0), "{x:?}");
        assert!((s - (1.0 + (-1f32).exp() + (-2f32).exp() + (-3f32).exp())).abs() < 1e-5);
    }
}
