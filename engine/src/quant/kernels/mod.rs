//! Vec-dot kernels per weight format and their one-time runtime dispatch.
//!
//! A kernel computes `dot(w, a)` over `n` elements: `w` one weight row in its ggml format,
//! `a` one activation row already in the weight's vec-dot format (see
//! [`GgmlDType::vec_dot_type`]; raw f32 bytes for float weights). Kernels never allocate.

use super::GgmlDType;
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
mod avx2;
pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
mod vnni;

/// `dot(n_elements, weight_row_bytes, activation_row_bytes)`.
pub(crate) type VecDotFn = fn(usize, &[u8], &[u8]) -> f32;

/// `dot4(n_elements, weight_row_bytes, four_activation_rows)`: one weight row against four
/// activation rows, unpacking the weights once (prefill).
pub(crate) type VecDot4Fn = fn(usize, &[u8], [&[u8]; 4]) -> [f32; 4];

/// Bytes per 32-element block of a packed 4-row weight tile (see [`Tiled`]): the four rows'
/// weights as unsigned bytes (4 x 32), then four f32 scales `d` and four f32 `m` (zero where
/// the format has none).
pub(crate) const TILE_BLOCK_BYTES: usize = 160;

/// `pack(n_elements, four_weight_rows, tile)`: four weight rows unpacked into a tile of
/// `n / 32 * TILE_BLOCK_BYTES` bytes, once per tile rather than once per activation row.
pub(crate) type TilePackFn = fn(usize, [&[u8]; 4], &mut [u8]);

/// `dot4x4(n_elements, tile, four_activation_rows, their_scales)`:
/// `out[c][r] = dot(w[r], a[c])` (one output row's four columns together), a register-blocked
/// micro-kernel that loads each weight block
/// once for four activation rows and each activation block once for four weight rows.
/// `scales[c]` is activation row `c`'s [`activation_scales`], made once per product.
pub(crate) type VecDot4x4Fn = fn(usize, &[u8], [&[u8]; 4], [&[f32]; 4]) -> [[f32; 4]; 4];

/// Four weight rows (a packed tile) · one activation row (and its scales), with the 4x4
/// kernel's per-pair arithmetic.
pub(crate) type VecDot4x1Fn = fn(usize, &[u8], &[u8], &[f32]) -> [f32; 4];

/// The register-blocked kernels of one weight format: every (weight row, activation row) pair
/// gets the same arithmetic whatever the batch.
#[derive(Clone, Copy)]
pub(crate) struct Tiled {
    /// Packs four weight rows into a tile.
    pub pack: TilePackFn,
    /// Tile · four activation rows.
    pub k44: VecDot4x4Fn,
    /// Tile · one activation row.
    pub k41: VecDot4x1Fn,
}

/// Each block's f16 header of an activation row in `vdt` (Q8_0 or Q8_1), as the f32 pairs the
/// 4x4 kernels read: `(d, s)` for Q8_1, `(d, 0)` for Q8_0; `out` holds two per block.
pub(crate) fn activation_scales(vdt: GgmlDType, row: &[u8], out: &mut [f32]) {
    let bytes = vdt.type_size();
    for (block, pair) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(2)) {
        let f16 = |k: usize| half::f16::from_le_bytes([block[k], block[k + 1]]).to_f32();
        pair[0] = f16(0);
        pair[1] = if vdt == GgmlDType::Q8_1 { f16(2) } else { 0.0 };
    }
}

/// Dequantizes whole blocks (`bytes` of the format, `out` their elements), bit-identical to
/// the reference code; [`crate::quant::dequantize`] uses it where one exists.
pub(crate) type DequantFn = fn(&[u8], &mut [f32]);

/// The kernel set chosen for this CPU.
pub(crate) struct Kernels {
    /// Name of the best instruction set in use ("avx512vnni", "avxvnni", "avx2", "scalar").
    pub name: &'static str,
    dots: [VecDotFn; 15],
    dots4: [Option<VecDot4Fn>; 15],
    tiled: [Option<Tiled>; 15],
    dequant: [Option<DequantFn>; 15],
}

impl Kernels {
    /// The vec-dot kernel for weights of `dtype`.
    #[inline(always)]
    pub fn dot(&self, dtype: GgmlDType) -> VecDotFn {
        self.dots[index(dtype)]
    }

    /// The four-activation-row kernel for weights of `dtype`, where one exists.
    #[inline(always)]
    pub fn dot4(&self, dtype: GgmlDType) -> Option<VecDot4Fn> {
        self.dots4[index(dtype)]
    }

    /// The register-blocked kernels of `dtype`, where they exist.
    #[inline(always)]
    pub fn blocked(&self, dtype: GgmlDType) -> Option<Tiled> {
        self.tiled[index(dtype)]
    }

    /// A SIMD dequantizer for `dtype`, where one exists (else use the reference one).
    #[inline(always)]
    pub fn dequant(&self, dtype: GgmlDType) -> Option<DequantFn> {
        self.dequant[index(dtype)]
    }
}

/// Position of `dtype` in the kernel tables.
fn index(dtype: GgmlDType) -> usize {
    GgmlDType::ALL.iter().position(|&t| t == dtype).unwrap_or(0)
}

/// The portable scalar kernel for weights of `dtype` (the oracle).
pub(crate) fn scalar_dot(dtype: GgmlDType) -> VecDotFn {
    use scalar::*;
    match dtype {
        GgmlDType::F32 => dot_f32,
        GgmlDType::F16 => dot_f16,
        GgmlDType::BF16 => dot_bf16,
        GgmlDType::Q4_0 => dot_q4_0_q8_0,
        GgmlDType::Q4_1 => dot_q4_1_q8_1,
        GgmlDType::Q5_0 => dot_q5_0_q8_0,
        GgmlDType::Q5_1 => dot_q5_1_q8_1,
        GgmlDType::Q8_0 => dot_q8_0_q8_0,
        GgmlDType::Q8_1 => dot_q8_1_q8_1,
        GgmlDType::Q2K => dot_q2k_q8k,
        GgmlDType::Q3K => dot_q3k_q8k,
        GgmlDType::Q4K => dot_q4k_q8k,
        GgmlDType::Q5K => dot_q5k_q8k,
        GgmlDType::Q6K => dot_q6k_q8k,
        GgmlDType::Q8K => dot_q8k_q8k,
    }
}

/// Scalar kernels for every format.
fn scalar_kernels() -> Kernels {
    Kernels {
        name: "scalar",
        dots: GgmlDType::ALL.map(scalar_dot),
        dots4: [None; 15],
        tiled: [None; 15],
        dequant: [None; 15],
    }
}

/// The best kernels for this CPU, detected once.
pub(crate) fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        // `mut` is only needed where a SIMD set can replace the scalar kernels.
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut k = scalar_kernels();
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("PREFIX_RFT_QUANT_SCALAR").is_none() {
            if let Some(simd) = avx2::dots() {
                k.name = "avx2";
                for (t, f) in simd {
                    k.dots[index(t)] = f;
                }
                for (t, f) in avx2::dots4().unwrap_or_default() {
                    k.dots4[index(t)] = Some(f);
                }
                for (t, f) in avx2::dequantizers().unwrap_or_default() {
                    k.dequant[index(t)] = Some(f);
                }
                // VNNI replaces the int8 kernels it has; PREFIX_RFT_QUANT_NO_VNNI keeps AVX2
                // (for A/B benchmarks).
                if std::env::var_os("PREFIX_RFT_QUANT_NO_VNNI").is_none() {
                    if let Some(set) = vnni::sets().into_iter().next() {
                        k.name = set.name;
                        for (t, f) in set.dots {
                            k.dots[index(t)] = f;
                        }
                        for (t, f) in set.tiled {
                            k.tiled[index(t)] = Some(f);
                        }
                    }
                }
            }
        }
        k
    })
}

/// The SIMD dequantizers available on this CPU (for tests).
#[cfg(test)]
pub(crate) fn simd_dequantizers() -> Vec<(GgmlDType, DequantFn)> {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::dequantizers().unwrap_or_default()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// The four-row SIMD kernels available on this CPU (for tests).
#[cfg(test)]
pub(crate) fn simd_dots4() -> Vec<(GgmlDType, VecDot4Fn)> {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::dots4().unwrap_or_default()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// Every set of register-blocked kernels available on this CPU, with its set's name (tests).
#[cfg(test)]
pub(crate) fn simd_tiled() -> Vec<(&'static str, GgmlDType, Tiled)> {
    #[cfg(target_arch = "x86_64")]
    {
        vnni::sets()
            .into_iter()
            .flat_map(|s| s.tiled.into_iter().map(move |(t, f)| (s.name, t, f)))
            .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

/// The SIMD kernels available on this CPU, every instruction set (for tests comparing them to
/// the scalar oracle).
#[cfg(test)]
pub(crate) fn simd_dots() -> Vec<(GgmlDType, VecDotFn)> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut v = avx2::dots().unwrap_or_default();
        for s in vnni::sets() {
            v.extend(s.dots);
        }
        v
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}
