//! Tests of the quant module: candle as the dequantization reference, round-trip bounds,
//! matmul against dequantized math, SIMD against the scalar oracle, validation and the pool.

use super::kernels::{
    activation_scales, scalar_dot, simd_dequantizers, simd_dots, simd_dots4, simd_tiled, Tiled,
    TILE_BLOCK_BYTES,
};
use super::*;
use candle_core::quantized::{GgmlDType as CDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Gaussian-ish test data (sum of uniforms) with a few outliers, like real weights.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let g: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>() * 0.5;
            if i % 97 == 13 {
                g * 6.0
            } else {
                g
            }
        })
        .collect()
}

fn candle_dtype(t: GgmlDType) -> CDType {
    match t {
        GgmlDType::F32 => CDType::F32,
        GgmlDType::F16 => CDType::F16,
        GgmlDType::BF16 => CDType::BF16,
        GgmlDType::Q4_0 => CDType::Q4_0,
        GgmlDType::Q4_1 => CDType::Q4_1,
        GgmlDType::Q5_0 => CDType::Q5_0,
        GgmlDType::Q5_1 => CDType::Q5_1,
        GgmlDType::Q8_0 => CDType::Q8_0,
        GgmlDType::Q8_1 => CDType::Q8_1,
        GgmlDType::Q2K => CDType::Q2K,
        GgmlDType::Q3K => CDType::Q3K,
        GgmlDType::Q4K => CDType::Q4K,
        GgmlDType::Q5K => CDType::Q5K,
        GgmlDType::Q6K => CDType::Q6K,
        GgmlDType::Q8K => CDType::Q8K,
    }
}

/// Blocks made by candle's quantizer (a reference nobody here wrote): (bytes, candle's dequant).
fn candle_blocks(t: GgmlDType, rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let x = Tensor::from_vec(data(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&x, candle_dtype(t)).unwrap();
    let bytes = q.data().unwrap().into_owned();
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (bytes, deq)
}

#[test]
fn ggml_ids_names_and_sizes_round_trip() {
    for t in GgmlDType::ALL {
        assert_eq!(GgmlDType::from_ggml_id(t.ggml_id()), Some(t));
        let c = candle_dtype(t);
        assert_eq!(t.block_size(), c.block_size(), "{}", t.name());
        assert_eq!(t.type_size(), c.type_size(), "{}", t.name());
    }
    assert_eq!(GgmlDType::from_ggml_id(4), None);
    assert_eq!(GgmlDType::Q6K.name(), "Q6_K");
    assert_eq!(GgmlDType::Q4_1.row_bytes(576), Some(18 * 20));
    assert_eq!(GgmlDType::Q4K.row_bytes(576), None);
    assert_eq!(GgmlDType::F32.row_bytes(usize::MAX), None);
}

#[test]
fn dequantize_matches_candle_for_every_type() {
    for t in GgmlDType::ALL {
        if t == GgmlDType::Q8_1 {
            continue; // candle cannot dequantize Q8_1; covered by the next test.
        }
        let (bytes, want) = candle_blocks(t, 4, 512, 7);
        let mut got = vec![0f32; want.len()];
        dequantize(t, &bytes, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w || (g - w).abs() <= 1e-6 * w.abs(),
                "{} [{i}]: {g} vs {w}",
                t.name()
            );
        }
    }
}

#[test]
fn q8_1_dequantizes_as_scale_times_quant_and_stores_scaled_sum() {
    let x = data(64, 3);
    let b = quantize(GgmlDType::Q8_1, &x).unwrap();
    let mut y = vec![0f32; 64];
    dequantize(GgmlDType::Q8_1, &b, &mut y).unwrap();
    for blk in 0..2 {
        let bb = &b[36 * blk..36 * blk + 36];
        let d = half::f16::from_bits(u16::from_le_bytes([bb[0], bb[1]])).to_f32();
        let s = half::f16::from_bits(u16::from_le_bytes([bb[2], bb[3]])).to_f32();
        let sum: i32 = bb[4..].iter().map(|&q| q as i8 as i32).sum();
        assert!((s - d * sum as f32).abs() <= 2e-3 * s.abs().max(1e-3));
        for j in 0..32 {
            assert_eq!(y[32 * blk + j], d * (bb[4 + j] as i8) as f32);
        }
    }
    for (a, b) in x.iter().zip(&y) {
        assert!((a - b).abs() < 0.03, "{a} vs {b}");
    }
}

#[test]
fn quantize_dequantize_round_trip_error_within_format_bound() {
    // Bound on RMS error relative to RMS of the data, per format.
    let cases = [
        (GgmlDType::F32, 0.0),
        (GgmlDType::F16, 1e-3),
        (GgmlDType::BF16, 5e-3),
        (GgmlDType::Q8_0, 0.01),
        (GgmlDType::Q8_1, 0.01),
        (GgmlDType::Q8K, 0.02),
        (GgmlDType::Q6K, 0.04),
        (GgmlDType::Q5_0, 0.08),
        (GgmlDType::Q5_1, 0.08),
        (GgmlDType::Q4_0, 0.16),
        (GgmlDType::Q4_1, 0.16),
        (GgmlDType::Q4K, 0.16),
    ];
    let x = data(4096, 11);
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    for (t, bound) in cases {
        let b = quantize(t, &x).unwrap();
        assert_eq!(b.len(), t.row_bytes(x.len()).unwrap());
        let mut y = vec![0f32; x.len()];
        dequantize(t, &b, &mut y).unwrap();
        let err = (x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / x.len() as f32)
            .sqrt();
        assert!(
            err <= bound * rms,
            "{}: rms err {err} vs bound {}",
            t.name(),
            bound * rms
        );
    }
    // All-zero input quantizes to all-zero output for every quantizer.
    for (t, _) in cases {
        let z = vec![0f32; 512];
        let mut y = vec![1f32; 512];
        dequantize(t, &quantize(t, &z).unwrap(), &mut y).unwrap();
        assert!(y.iter().all(|&v| v == 0.0), "{}", t.name());
    }
}

#[test]
fn weight_quantizers_match_candle_bytes_for_legacy_formats() {
    for t in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
    ] {
        let (want, _) = candle_blocks(t, 4, 512, 21);
        let got = quantize(t, &data(4 * 512, 21)).unwrap();
        assert_eq!(got, want, "{}", t.name());
    }
}

#[test]
fn quantize_rejects_unsupported_and_partial_blocks() {
    assert!(matches!(
        quantize(GgmlDType::Q3K, &[0.0; 256]),
        Err(QuantError::UnsupportedType { .. })
    ));
    assert!(matches!(
        quantize(GgmlDType::Q4_0, &[0.0; 33]),
        Err(QuantError::BadShape { .. })
    ));
    let mut out = [0f32; 32];
    assert!(matches!(
        dequantize(GgmlDType::Q4_0, &[0; 17], &mut out),
        Err(QuantError::SizeMismatch { .. })
    ));
}

/// Weight bytes for `t`: our quantizer where we have one, candle's otherwise.
fn weight(t: GgmlDType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let bytes = match quantize(t, &data(rows * cols, seed)) {
        Ok(b) => b,
        Err(_) => candle_blocks(t, rows, cols, seed).0,
    };
    QMatrix::new(t, rows, cols, bytes.into()).unwrap()
}

/// `x · Wᵀ` from dequantized weights and dequantized vec-dot activations, in f64, plus the
/// L1 magnitude sum(|w·x|) that scales the tolerance.
fn reference(w: &QMatrix, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
    let (rows, cols) = (w.rows(), w.cols());
    let wf = w.to_f32();
    let mut want = vec![0f64; m * rows];
    let mut mag = vec![0f64; m * rows];
    for i in 0..m {
        let xr = &x[i * cols..(i + 1) * cols];
        let mut xq = xr.to_vec();
        let mut q81 = None;
        if let Some(vdt) = w.dtype().vec_dot_type() {
            let b = quantize(vdt, xr).unwrap();
            dequantize(vdt, &b, &mut xq).unwrap();
            if matches!(w.dtype(), GgmlDType::Q4_1 | GgmlDType::Q5_1) {
                q81 = Some(b);
            }
        }
        for r in 0..rows {
            let wr = &wf[r * cols..(r + 1) * cols];
            let mut s: f64 = wr.iter().zip(&xq).map(|(&a, &b)| a as f64 * b as f64).sum();
            let l1: f64 = wr
                .iter()
                .zip(&xq)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            if let Some(b) = &q81 {
                // ggml's Q4_1/Q5_1 dot uses the f16-rounded s = d*sum(q) of the Q8_1 block for
                // the minimum term; apply the same rounding to the reference.
                let wb = w.row_bytes_slice(r);
                let wts = w.dtype().type_size();
                for blk in 0..cols / 32 {
                    let ab = &b[36 * blk..];
                    let f = |o: usize, s: &[u8]| {
                        half::f16::from_bits(u16::from_le_bytes([s[o], s[o + 1]])).to_f32() as f64
                    };
                    let exact: f64 = xq[32 * blk..32 * blk + 32].iter().map(|&v| v as f64).sum();
                    s += f(2, &wb[wts * blk..]) * (f(2, ab) - exact);
                }
            }
            want[i * rows + r] = s;
            mag[i * rows + r] = l1;
        }
    }
    (want, mag)
}

fn check_matmul(t: GgmlDType, rows: usize, cols: usize, m: usize) {
    let w = weight(t, rows, cols, rows as u64 * 31 + cols as u64);
    let x = data(m * cols, 99 + m as u64);
    let mut out = vec![f32::NAN; m * rows];
    w.matmul(&x, m, &mut out).unwrap();
    let (want, mag) = reference(&w, &x, m);
    for k in 0..m * rows {
        let err = (out[k] as f64 - want[k]).abs();
        assert!(
            err <= 1e-4 * mag[k] + 1e-6,
            "{} {rows}x{cols} m={m} [{k}]: {} vs {} (mag {})",
            t.name(),
            out[k],
            want[k],
            mag[k]
        );
    }
}

#[test]
fn matmul_of_every_type_matches_dequantized_reference() {
    for t in GgmlDType::ALL {
        let cols = if t.block_size() == 256 { 512 } else { 576 };
        for rows in [7, 33] {
            for m in [1, 3, 17] {
                check_matmul(t, rows, cols, m);
            }
        }
    }
}

#[test]
fn matmul_of_int8_kernel_formats_matches_reference_for_every_tile_remainder() {
    // The 4x4 micro-kernels cover whole 4-row by 4-activation tiles; odd row counts and m not a
    // multiple of four exercise every remainder path (4-row kernel, one-row kernel).
    for t in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for rows in [1, 5, 19, 35] {
            for m in [1, 3, 4, 5, 16, 17] {
                check_matmul(t, rows, 96, m);
            }
        }
    }
    set_num_threads(2);
    check_matmul(GgmlDType::Q4_1, 3072, 576, 16);
    check_matmul(GgmlDType::Q8_0, 1003, 576, 5);
}

/// `out[r][c] = dot(w[r], a[c])` through a register-blocked kernel set as `matmul` runs it:
/// the rows packed into a tile, the activation scales made, then the 4x4 kernel; also checks
/// that the 4x1 kernel gives every column bit for bit.
fn tiled_dots(t: GgmlDType, k: Tiled, n: usize, w: [&[u8]; 4], a: [&[u8]; 4]) -> [[f32; 4]; 4] {
    let vdt = t.vec_dot_type().unwrap();
    let mut tile = vec![0u8; n / 32 * TILE_BLOCK_BYTES];
    (k.pack)(n, w, &mut tile);
    let scales: Vec<Vec<f32>> = a
        .iter()
        .map(|a| {
            let mut s = vec![0f32; n / 16];
            activation_scales(vdt, a, &mut s);
            s
        })
        .collect();
    let s = [0, 1, 2, 3].map(|c| &scales[c][..]);
    let out = (k.k44)(n, &tile, a, s);
    for c in 0..4 {
        let col = (k.k41)(n, &tile, a[c], s[c]);
        assert_eq!(
            col.map(f32::to_bits),
            out[c].map(f32::to_bits),
            "4x1 and 4x4 differ"
        );
    }
    [0, 1, 2, 3].map(|r| [0, 1, 2, 3].map(|c| out[c][r]))
}

#[test]
fn simd_4x4_micro_kernels_equal_scalar_oracle() {
    let mut rng = StdRng::seed_from_u64(9);
    let kernels = simd_tiled();
    if cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx512vnni") {
        assert!(!kernels.is_empty(), "no 4x4 kernel on a VNNI CPU");
    }
    for (name, t, k44) in kernels {
        let scalar = scalar_dot(t);
        let vdt = t.vec_dot_type().unwrap();
        for n in [32, 64, 96, 576, 1536] {
            for trial in 0..3u64 {
                let w: Vec<Vec<u8>> = (0..4u64)
                    .map(|r| {
                        if trial == 1 {
                            random_blocks(t, n, &mut rng)
                        } else {
                            weight(t, 1, n, 7 * r + n as u64 + trial)
                                .row_bytes_slice(0)
                                .to_vec()
                        }
                    })
                    .collect();
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|k| quantize(vdt, &data(n, 60 + k + 10 * trial)).unwrap())
                    .collect();
                let got = tiled_dots(
                    t,
                    k44,
                    n,
                    [0, 1, 2, 3].map(|r| &w[r][..]),
                    [0, 1, 2, 3].map(|k| &acts[k][..]),
                );
                for r in 0..4 {
                    for c in 0..4 {
                        let s = scalar(n, &w[r], &acts[c]);
                        assert!(
                            (s - got[r][c]).abs() <= 1e-5 * s.abs().max(1.0) * (n as f32).sqrt(),
                            "{name} {} n={n} trial={trial} [{r}][{c}]: scalar {s} simd {}",
                            t.name(),
                            got[r][c]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_of_model_shapes_matches_dequantized_reference() {
    set_num_threads(2);
    check_matmul(GgmlDType::Q4_1, 576, 576, 1);
    check_matmul(GgmlDType::Q4_1, 1536, 576, 3);
    check_matmul(GgmlDType::Q4_1, 576, 1536, 17);
    check_matmul(GgmlDType::Q8_0, 1536, 576, 1);
    check_matmul(GgmlDType::Q4K, 576, 1536, 3);
    check_matmul(GgmlDType::Q6K, 1536, 512, 1);
}

#[test]
fn simd_vec_dots_equal_scalar_oracle() {
    let mut rng = StdRng::seed_from_u64(5);
    for (t, simd) in simd_dots() {
        let scalar = scalar_dot(t);
        let sizes: &[usize] = if t.block_size() == 256 {
            &[256, 512, 1536]
        } else if t.block_size() == 32 {
            &[32, 64, 96, 576, 1536]
        } else {
            &[1, 7, 31, 33, 576, 1537]
        };
        for &n in sizes {
            for trial in 0..4 {
                // Weights: random bytes exercise every bit pattern of the layout; f16/f32
                // scale fields are then overwritten with sane values by re-quantizing where
                // a quantizer exists, else by masking.
                let w = if trial % 2 == 0 {
                    weight(t, 1, n, trial as u64 + n as u64)
                        .row_bytes_slice(0)
                        .to_vec()
                } else {
                    random_blocks(t, n, &mut rng)
                };
                let x = data(n, 1000 + trial as u64);
                let a = match t.vec_dot_type() {
                    Some(v) => quantize(v, &x).unwrap(),
                    None => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                };
                let (s, v) = (scalar(n, &w, &a), simd(n, &w, &a));
                let mag = (scalar(n, &w, &a).abs()).max(1.0);
                assert!(
                    (s - v).abs() <= 1e-5 * mag * (n as f32).sqrt(),
                    "{} n={n} trial={trial}: scalar {s} simd {v}",
                    t.name()
                );
            }
        }
    }
}

#[test]
fn simd_four_row_vec_dots_equal_scalar_oracle() {
    for (t, simd4) in simd_dots4() {
        let scalar = scalar_dot(t);
        let vdt = t.vec_dot_type().unwrap();
        for n in [32, 96, 576, 1536] {
            let w = weight(t, 1, n, n as u64).row_bytes_slice(0).to_vec();
            let acts: Vec<Vec<u8>> = (0..4)
                .map(|k| quantize(vdt, &data(n, 50 + k)).unwrap())
                .collect();
            let got = simd4(n, &w, [0, 1, 2, 3].map(|k| &acts[k][..]));
            for k in 0..4 {
                let s = scalar(n, &w, &acts[k]);
                assert!(
                    (s - got[k]).abs() <= 1e-5 * s.abs().max(1.0) * (n as f32).sqrt(),
                    "{} n={n} row {k}: scalar {s} simd {}",
                    t.name(),
                    got[k]
                );
            }
        }
    }
}

/// Random blocks of `t` whose f16 scales are 1 and minimums/sums 0, so that every kernel's
/// result is the raw integer dot (exact in f32 below 2^24). Int8 quants avoid -128, which the
/// sign trick cannot negate and which ggml's Q8 quantizers never produce.
fn unit_scale_blocks(t: GgmlDType, n: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b: Vec<u8> = (0..t.row_bytes(n).unwrap())
        .map(|_| rng.gen_range(-127i8..=127) as u8)
        .collect();
    let one = half::f16::from_f32(1.0).to_bits().to_le_bytes();
    for blk in b.chunks_exact_mut(t.type_size()) {
        blk[0..2].copy_from_slice(&one);
        if matches!(t, GgmlDType::Q4_1 | GgmlDType::Q8_1) {
            blk[2..4].copy_from_slice(&[0, 0]);
        }
    }
    b
}

#[test]
fn simd_integer_parts_are_exact() {
    let mut rng = StdRng::seed_from_u64(13);
    let n = 1536;
    let int8 = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
    for (t, simd) in simd_dots().into_iter().filter(|(t, _)| int8.contains(t)) {
        let vdt = t.vec_dot_type().unwrap();
        for _ in 0..8 {
            let (w, a) = (
                unit_scale_blocks(t, n, &mut rng),
                unit_scale_blocks(vdt, n, &mut rng),
            );
            assert_eq!(simd(n, &w, &a), scalar_dot(t)(n, &w, &a), "{}", t.name());
        }
    }
    for (name, t, k44) in simd_tiled() {
        let vdt = t.vec_dot_type().unwrap();
        let w: Vec<Vec<u8>> = (0..4).map(|_| unit_scale_blocks(t, n, &mut rng)).collect();
        let a: Vec<Vec<u8>> = (0..4)
            .map(|_| unit_scale_blocks(vdt, n, &mut rng))
            .collect();
        let got = tiled_dots(
            t,
            k44,
            n,
            [0, 1, 2, 3].map(|r| &w[r][..]),
            [0, 1, 2, 3].map(|c| &a[c][..]),
        );
        for r in 0..4 {
            for c in 0..4 {
                assert_eq!(
                    got[r][c],
                    scalar_dot(t)(n, &w[r], &a[c]),
                    "{name} {}",
                    t.name()
                );
            }
        }
    }
}

/// Random bytes for `n` elements of `t` with finite, moderate f16 scales.
fn random_blocks(t: GgmlDType, n: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut b: Vec<u8> = (0..t.row_bytes(n).unwrap()).map(|_| rng.gen()).collect();
    let scale_offsets: &[usize] = match t {
        GgmlDType::Q4_0 | GgmlDType::Q5_0 | GgmlDType::Q8_0 => &[0],
        GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q8_1 => &[0, 2],
        GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
        GgmlDType::Q2K => &[80, 82],
        GgmlDType::Q3K => &[108],
        GgmlDType::Q6K => &[208],
        _ => {
            // Float formats: replace with real values.
            let x = data(n, 77);
            return quantize(t, &x).unwrap();
        }
    };
    for blk in b.chunks_exact_mut(t.type_size()) {
        for &o in scale_offsets {
            let v = half::f16::from_f32(rng.gen_range(-0.01f32..0.01));
            blk[o..o + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    b
}

#[test]
fn qmatrix_new_rejects_bad_lengths_and_partial_blocks() {
    let ok = QMatrix::new(GgmlDType::Q4_1, 2, 64, vec![0u8; 2 * 40].into());
    assert!(ok.is_ok());
    let e = QMatrix::new(GgmlDType::Q4_1, 2, 64, vec![0u8; 79].into()).unwrap_err();
    assert!(
        matches!(
            e,
            QuantError::SizeMismatch {
                expected: 80,
                actual: 79,
                ..
            }
        ),
        "{e}"
    );
    let e = QMatrix::new(GgmlDType::Q4_1, 2, 48, vec![0u8; 60].into()).unwrap_err();
    assert!(matches!(e, QuantError::BadShape { .. }), "{e}");
    assert!(e.to_string().contains("block size"));
    let e = QMatrix::new(GgmlDType::Q4K, 1, 576, vec![0u8; 0].into()).unwrap_err();
    assert!(matches!(e, QuantError::BadShape { .. }));
    let e = QMatrix::new(GgmlDType::F32, usize::MAX, 2, vec![].into()).unwrap_err();
    assert!(matches!(e, QuantError::BadShape { .. }));
    let w = ok.unwrap();
    assert!(w.matmul(&[0.0; 63], 1, &mut [0.0; 2]).is_err());
    assert!(w.matmul(&[0.0; 64], 1, &mut [0.0; 3]).is_err());
    assert!(matches!(
        w.dequantize_row(2, &mut [0.0; 64]),
        Err(QuantError::RowOutOfRange { .. })
    ));
}

#[test]
fn dequantize_row_and_to_f32_agree() {
    let w = weight(GgmlDType::Q8_0, 5, 64, 1);
    let all = w.to_f32();
    let mut row = vec![0f32; 64];
    w.dequantize_row(3, &mut row).unwrap();
    assert_eq!(&all[3 * 64..4 * 64], &row[..]);
}

#[test]
fn mapped_weight_bytes_are_zero_copy_views() {
    let mut f = tempfile::tempfile().unwrap();
    let x = data(64, 2);
    let q = quantize(GgmlDType::Q4_1, &x).unwrap();
    std::io::Write::write_all(&mut f, &[1, 2, 3]).unwrap();
    std::io::Write::write_all(&mut f, &q).unwrap();
    // SAFETY: the temp file is private to this test and not modified while mapped.
    let map = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&f) }.unwrap());
    assert!(WeightBytes::mapped(map.clone(), 3, q.len() + 1).is_err());
    let wb = WeightBytes::mapped(map, 3, q.len()).unwrap();
    assert_eq!(&wb[..], &q[..]);
    let w = QMatrix::new(GgmlDType::Q4_1, 1, 64, wb).unwrap();
    let mut y = vec![0f32; 64];
    w.dequantize_row(0, &mut y).unwrap();
    let mut z = vec![0f32; 64];
    dequantize(GgmlDType::Q4_1, &q, &mut z).unwrap();
    assert_eq!(y, z);
}

#[test]
fn parallel_for_runs_each_task_once_and_nests() {
    set_num_threads(2);
    for n in [1usize, 2, 3, 17, 1000] {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        parallel_for(n, &|t| {
            // A nested call runs inline instead of deadlocking.
            parallel_for(2, &|_| {});
            hits[t].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
    // Concurrent callers from several threads all complete correctly.
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..200 {
                    let c = AtomicUsize::new(0);
                    parallel_for(8, &|_| {
                        c.fetch_add(1, Ordering::Relaxed);
                    });
                    assert_eq!(c.load(Ordering::Relaxed), 8);
                }
            });
        }
    });
}

#[test]
fn parallel_for_propagates_task_panics() {
    set_num_threads(2);
    let r = std::panic::catch_unwind(|| {
        parallel_for(4, &|t| {
            if t == 3 {
                panic!("boom");
            }
        })
    });
    assert!(r.is_err());
    // The pool still works afterwards.
    let c = AtomicUsize::new(0);
    parallel_for(4, &|_| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(c.load(Ordering::Relaxed), 4);
}

/// GEMV/GEMM throughput; run with
/// `cargo test -p prefix-rft-engine --lib quant::tests::bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_gemv_throughput() {
    use std::time::Instant;
    println!("kernels: {}", super::kernels::kernels().name);
    let shapes = [
        (GgmlDType::Q4_1, 576, 576),
        (GgmlDType::Q4_1, 1536, 576),
        (GgmlDType::Q4_1, 576, 1536),
        (GgmlDType::Q4_1, 3072, 576),
        (GgmlDType::Q8_0, 49152, 576),
    ];
    for threads in [1, 2] {
        set_num_threads(threads);
        for &(t, rows, cols) in &shapes {
            let w = weight(t, rows, cols, 1);
            for m in [1usize, 4, 16, 64] {
                let x = data(m * cols, 2);
                let mut out = vec![0f32; m * rows];
                let iters = ((2e8 / (w.size_in_bytes() * m) as f64) as usize).clamp(5, 20000);
                for _ in 0..iters.min(50) {
                    w.matmul(&x, m, &mut out).unwrap();
                }
                let t0 = Instant::now();
                for _ in 0..iters {
                    w.matmul(&x, m, &mut out).unwrap();
                }
                let us = t0.elapsed().as_secs_f64() * 1e6 / iters as f64;
                println!(
                    "{:5} {rows:5}x{cols:<5} m={m:<2} threads={threads}: {us:9.2} us/call  {:6.2} GB/s weights  {:7.1} GFLOP/s",
                    t.name(),
                    w.size_in_bytes() as f64 / us / 1e3,
                    2.0 * (rows * cols * m) as f64 / us / 1e3,
                );
            }
        }
        // Pool overhead: an empty 2-task job.
        let iters = 100_000;
        let t0 = Instant::now();
        for _ in 0..iters {
            parallel_for(threads * 2, &|_| {});
        }
        println!(
            "parallel_for overhead, threads={threads}: {:.2} us/call",
            t0.elapsed().as_secs_f64() * 1e6 / iters as f64
        );
    }
}

/// A row's result must not depend on which other rows share the call: the server batches
/// sequences together and promises the same greedy output alone or batched, and the quantized
/// model amplifies a one-ulp difference into a different token.
#[test]
fn matmul_rows_are_bit_identical_alone_and_batched() {
    for t in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::F32,
    ] {
        let (rows, cols) = (37, 512);
        let w = weight(t, rows, cols, 11);
        for m in [2, 4, 5, 8, 9, 16, 17] {
            let x = data(m * cols, 5 + m as u64);
            let mut batched = vec![0f32; m * rows];
            w.matmul(&x, m, &mut batched).expect("batched");
            for i in 0..m {
                let mut alone = vec![0f32; rows];
                w.matmul(&x[i * cols..(i + 1) * cols], 1, &mut alone)
                    .expect("alone");
                let same = alone
                    .iter()
                    .zip(&batched[i * rows..(i + 1) * rows])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{t:?}: row {i} of a batch of {m} differs from the same row alone"
                );
            }
        }
    }
}

/// A pair's result must not depend on which rows share its 4-row group either (the training
/// path splits fused matrices differently from serving).
#[test]
fn matmul_rows_are_bit_identical_in_any_row_grouping() {
    for t in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (rows, cols) = (37, 512);
        let w = weight(t, rows, cols, 11);
        let rb = t.row_bytes(cols).expect("row bytes");
        for m in [1, 4, 5] {
            let x = data(m * cols, 9);
            let mut full = vec![0f32; m * rows];
            w.matmul(&x, m, &mut full).expect("full");
            for skip in 1..4 {
                let sub = QMatrix::new(
                    t,
                    rows - skip,
                    cols,
                    WeightBytes::from(w.bytes()[skip * rb..].to_vec()),
                )
                .expect("sub");
                let mut part = vec![0f32; m * (rows - skip)];
                sub.matmul(&x, m, &mut part).expect("part");
                for i in 0..m {
                    for r in 0..rows - skip {
                        assert_eq!(
                            part[i * (rows - skip) + r].to_bits(),
                            full[i * rows + r + skip].to_bits(),
                            "{t:?} m={m} skip={skip} row {r}"
                        );
                    }
                }
            }
        }
    }
}

/// [`Activations::F32`]: the product of every quantized type equals the dequantized matrix's
/// f32 product (no activation rounding, so far tighter than the int8 path's bound), each row
/// bit-identical alone and batched, over every task split (rows, m, rows of a fused part).
#[test]
fn f32_activations_give_the_dequantized_product_whatever_the_batch() {
    set_num_threads(2);
    for t in GgmlDType::ALL {
        let cols = if t.block_size() == 256 { 512 } else { 576 };
        for rows in [7, 37, 600] {
            let w = weight(t, rows, cols, 3 + rows as u64).with_activations(Activations::F32);
            let wf = w.to_f32();
            for m in [1, 3, 17] {
                let x = data(m * cols, 21 + m as u64);
                let mut out = vec![f32::NAN; m * rows];
                w.matmul(&x, m, &mut out).unwrap();
                for i in 0..m {
                    let xr = &x[i * cols..(i + 1) * cols];
                    let mut alone = vec![f32::NAN; rows];
                    w.matmul(xr, 1, &mut alone).unwrap();
                    for r in 0..rows {
                        let wr = &wf[r * cols..(r + 1) * cols];
                        let want: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = wr
                            .iter()
                            .zip(xr)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        let got = out[i * rows + r];
                        assert!(
                            (got as f64 - want).abs() <= 1e-6 * mag + 1e-7,
                            "{} {rows}x{cols} m={m} [{i},{r}]: {got} vs {want}",
                            t.name()
                        );
                        assert_eq!(
                            got.to_bits(),
                            alone[r].to_bits(),
                            "{} row {i} of {m}",
                            t.name()
                        );
                    }
                }
                // A part of the rows (as the training path takes q of a fused q/k/v) gives
                // the same numbers as those columns of the whole product.
                let part = (rows / 3)..rows;
                let mut sub = vec![f32::NAN; m * part.len()];
                w.matmul_rows(part.clone(), &x, m, &mut sub).unwrap();
                for i in 0..m {
                    for (k, r) in part.clone().enumerate() {
                        assert_eq!(
                            sub[i * part.len() + k].to_bits(),
                            out[i * rows + r].to_bits()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn simd_dequantizers_equal_the_reference_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(17);
    for (t, f) in simd_dequantizers() {
        let n = 64 * t.block_size();
        let bytes = random_blocks(t, n, &mut rng);
        let (mut want, mut got) = (vec![0f32; n], vec![f32::NAN; n]);
        super::dequant::dequantize_reference(t, &bytes, &mut want).unwrap();
        f(&bytes, &mut got);
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{} element {k}: {a} vs {b}",
                t.name()
            );
        }
    }
}

#[test]
fn dequantize_block_gives_the_columns_of_whole_rows_and_refuses_partial_blocks() {
    for t in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::F32,
    ] {
        let bs = t.block_size();
        let (rows, cols) = (5, 3 * 256);
        let w = weight(t, rows, cols, 31);
        let mut whole = vec![0f32; 3 * cols];
        w.dequantize_rows(1, &mut whole).unwrap();
        for (c0, c1) in [(0, cols), (bs, cols), (0, 2 * bs), (256, 512)] {
            let width = c1 - c0;
            let mut part = vec![0f32; 3 * width];
            w.dequantize_block(1, c0..c1, &mut part).unwrap();
            for (r, got) in part.chunks_exact(width).enumerate() {
                assert_eq!(
                    got,
                    &whole[r * cols + c0..r * cols + c1],
                    "{t:?} {c0}..{c1}"
                );
            }
        }
        let mut out = vec![0f32; 2 * bs];
        assert!(
            w.dequantize_block(4, 0..bs, &mut out).is_err(),
            "past the rows"
        );
        if bs > 1 {
            let mut out = vec![0f32; bs];
            assert!(
                w.dequantize_block(0, 1..bs + 1, &mut out).is_err(),
                "off a block"
            );
        }
    }
}
