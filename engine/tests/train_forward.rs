//! The training forward: it computes what the serving forward computes (with and without
//! adapters, so what is trained is what is served), its gradients match finite differences for
//! every adapter parameter kind, the hand-written ops carry gradient, and the base stays frozen.

use candle_core::{DType, Device, Tensor, Var};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::{
    AdapterHook, KvCache, Llama, LoadOptions, LogitsWanted, Proj, SeqStep,
};
use prefix_rft_engine::quant::GgmlDType;
use prefix_rft_engine::testing::{load_tiny_gguf, max_abs_diff, TinySpec};
use prefix_rft_engine::train::fused::{LogSoftmaxGather, LoraDelta};
use prefix_rft_engine::train::{
    ops, HeadLogSoftmax, LoraConfig, PrefixConfig, QLoraLinear, QMatMulOp, TrainAdapter,
    TrainModel, TrainOptions,
};
use rand::{Rng, SeedableRng};

fn tiny_model(spec: &TinySpec, dtype: GgmlDType) -> (tempfile::TempDir, Llama) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = load_tiny_gguf(dir.path(), spec, dtype);
    (dir, model)
}

/// Serving logits of every position of `tokens`, `len × vocab`, row-major.
fn serving_logits(model: &Llama, tokens: &[u32], adapter: Option<&dyn AdapterHook>) -> Vec<f32> {
    let mut cache = KvCache::with_adapter(model.config(), adapter);
    let mut step = [SeqStep {
        tokens,
        cache: &mut cache,
        adapter,
        logits: LogitsWanted::All,
    }];
    model.forward(&mut step).expect("serving forward").data
}

fn lora_all(rank: usize) -> LoraConfig {
    LoraConfig {
        rank,
        alpha: 16.0,
        rslora: false,
        targets: Proj::ALL.to_vec(),
        seed: 3,
    }
}

fn prefix(n: usize) -> PrefixConfig {
    PrefixConfig {
        num_virtual_tokens: n,
        init_std: 1.0,
        seed: 5,
    }
}

/// Overwrites every LoRA B (zero after PEFT init) with seeded random values, so the LoRA
/// path actually changes the output and A receives gradient.
fn randomise_lora_b(adapter: &TrainAdapter, std: f64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (_, l) in adapter.lora_layers() {
        let t = l.b.as_tensor();
        let n = t.elem_count();
        let v: Vec<f64> = (0..n)
            .map(|_| rng.gen_range(-std..std) * 3f64.sqrt())
            .collect();
        let new = Tensor::from_vec(v, t.shape(), t.device())
            .and_then(|x| x.to_dtype(t.dtype()))
            .expect("tensor");
        l.b.set(&new).expect("set B");
    }
}

#[test]
fn train_forward_matches_serving_forward() {
    let seqs: [&[u32]; 3] = [&[1, 5, 9, 33, 2, 70, 11, 4, 60], &[7, 3, 88, 21, 5], &[42]];
    let mut worst = 0f32;
    for spec in [
        TinySpec::default(),
        TinySpec {
            tied: true,
            bias: true,
            ..TinySpec::default()
        },
    ] {
        let (_d, model) = tiny_model(&spec, GgmlDType::F32);
        let cfg = model.config().clone();
        let train = TrainModel::from_llama(&model, &Device::Cpu, TrainOptions::default())
            .expect("train model");
        let lora = TrainAdapter::new(&cfg, Some(&lora_all(4)), None, DType::F32, &Device::Cpu)
            .expect("lora");
        randomise_lora_b(&lora, 0.1, 11);
        let pre = TrainAdapter::new(&cfg, None, Some(&prefix(3)), DType::F32, &Device::Cpu)
            .expect("prefix");
        let both = TrainAdapter::new(
            &cfg,
            Some(&lora_all(2)),
            Some(&prefix(2)),
            DType::F32,
            &Device::Cpu,
        )
        .expect("both");
        randomise_lora_b(&both, 0.1, 12);
        for (name, adapter) in [
            ("base", None),
            ("lora", Some(&lora)),
            ("prefix", Some(&pre)),
            ("lora+prefix", Some(&both)),
        ] {
            let hook = adapter.map(|a| a.to_weights(&cfg).expect("snapshot"));
            let hook_dyn = hook.as_ref().map(|h| h as &dyn AdapterHook);
            let logits = train.forward(&seqs, adapter).expect("train forward");
            let (b, t, v) = logits.dims3().expect("dims");
            assert_eq!((b, t, v), (3, 9, spec.vocab));
            let rows = logits.to_vec3::<f32>().expect("to vec");
            let base = serving_logits(&model, seqs[0], None);
            for (i, seq) in seqs.iter().enumerate() {
                let want = serving_logits(&model, seq, hook_dyn);
                let got: Vec<f32> = rows[i][..seq.len()].concat();
                let diff = max_abs_diff(&got, &want);
                worst = worst.max(diff);
                assert!(diff < 1e-4, "{spec:?} {name} seq {i}: max |Δ| {diff}");
            }
            if adapter.is_some() {
                // The adapter must actually matter, or the comparison above proves nothing.
                let got: Vec<f32> = rows[0].concat();
                assert!(max_abs_diff(&got, &base) > 1e-2, "{name} changes nothing");
            }
        }
    }
    eprintln!("max |train − serving| logit difference: {worst:e}");
}

#[test]
fn token_logprobs_are_log_softmax_of_the_next_token_and_zero_past_the_end() {
    let spec = TinySpec::default();
    let (_d, model) = tiny_model(&spec, GgmlDType::F32);
    let train =
        TrainModel::from_llama(&model, &Device::Cpu, TrainOptions::default()).expect("train model");
    let seqs: [&[u32]; 2] = [&[1, 5, 9, 33], &[7, 3]];
    let lp = train
        .token_logprobs(&seqs, None)
        .expect("logprobs")
        .to_vec2::<f32>()
        .expect("vec");
    for (i, seq) in seqs.iter().enumerate() {
        let logits = serving_logits(&model, seq, None);
        for j in 0..3 {
            if j + 1 < seq.len() {
                let row = &logits[j * spec.vocab..(j + 1) * spec.vocab];
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                let want = row[seq[j + 1] as usize] - lse;
                assert!((lp[i][j] - want).abs() < 1e-4, "seq {i} pos {j}");
            } else {
                assert_eq!(lp[i][j], 0.0, "padding position {i},{j}");
            }
        }
    }
}

/// Sum of the target log-probs of a fixed batch: the scalar the gradient check differentiates.
fn loss(train: &TrainModel, adapter: &TrainAdapter) -> Tensor {
    let seqs: [&[u32]; 2] = [&[1, 5, 9, 33, 2, 70, 11], &[7, 3, 88, 21]];
    train
        .token_logprobs(&seqs, Some(adapter))
        .and_then(|t| Ok(t.sum_all()?))
        .expect("loss")
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .expect("scalar")
}

/// Sets element `idx` of `var` to `value`.
fn set_elem(var: &Var, idx: usize, value: f64) {
    let t = var.as_tensor();
    let mut v = t
        .flatten_all()
        .and_then(|x| x.to_vec1::<f64>())
        .expect("values");
    v[idx] = value;
    let new = Tensor::from_vec(v, t.shape(), t.device()).expect("tensor");
    var.set(&new).expect("set");
}

#[test]
fn finite_difference_gradients_match_autograd_for_lora_a_b_and_prefix_kv() {
    let spec = TinySpec {
        bias: true,
        ..TinySpec::default()
    };
    let (_d, model) = tiny_model(&spec, GgmlDType::F32);
    let opts = TrainOptions {
        dtype: DType::F64,
        ..TrainOptions::default()
    };
    let train = TrainModel::from_llama(&model, &Device::Cpu, opts).expect("train model");
    let adapter = TrainAdapter::new(
        model.config(),
        Some(&lora_all(2)),
        Some(&prefix(2)),
        DType::F64,
        &Device::Cpu,
    )
    .expect("adapter");
    randomise_lora_b(&adapter, 0.1, 13);
    let grads = loss(&train, &adapter).backward().expect("backward");

    let eps = 1e-5;
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut worst = (0f64, String::new());
    let named = adapter.named_vars();
    // 7 projections × (A, B) + prefix (key, value), per layer.
    assert_eq!(named.len(), spec.layers * (7 * 2 + 2));
    for (name, var) in &named {
        let g = grads
            .get(var.as_tensor())
            .expect("every adapter variable gets a gradient");
        let g = g
            .flatten_all()
            .and_then(|x| x.to_vec1::<f64>())
            .expect("grad");
        assert!(
            g.iter().any(|x| x.abs() > 1e-8),
            "{name}: gradient is all zero"
        );
        let values = var
            .as_tensor()
            .flatten_all()
            .and_then(|x| x.to_vec1::<f64>())
            .expect("v");
        for _ in 0..3 {
            let idx = rng.gen_range(0..values.len());
            set_elem(var, idx, values[idx] + eps);
            let up = scalar(&loss(&train, &adapter));
            set_elem(var, idx, values[idx] - eps);
            let down = scalar(&loss(&train, &adapter));
            set_elem(var, idx, values[idx]);
            let fd = (up - down) / (2.0 * eps);
            let err = (fd - g[idx]).abs() / (fd.abs().max(g[idx].abs()).max(1e-6));
            if err > worst.0 {
                worst = (err, format!("{name}[{idx}]: autograd {} fd {fd}", g[idx]));
            }
            assert!(
                err < 1e-5,
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
        }
    }
    eprintln!(
        "worst gradient relative error: {:e} at {}",
        worst.0, worst.1
    );
}

/// Checks d(Σ w·op(x))/dx against central differences on a small f64 tensor.
fn check_op(name: &str, op: impl Fn(&Tensor) -> Tensor, shape: (usize, usize, usize)) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(name.len() as u64);
    let n = shape.0 * shape.1 * shape.2;
    let xv: Vec<f64> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let wv: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let w = Tensor::from_vec(wv, shape, &Device::Cpu).expect("w");
    let f = |x: &Tensor| (op(x) * &w).and_then(|t| t.sum_all()).expect("loss");
    let x = Var::from_vec(xv.clone(), shape, &Device::Cpu).expect("x");
    let g = f(x.as_tensor()).backward().expect("backward");
    let g = g
        .get(x.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient reaches the input"))
        .flatten_all()
        .and_then(|t| t.to_vec1::<f64>())
        .expect("grad");
    assert!(g.iter().any(|v| v.abs() > 1e-6), "{name}: zero gradient");
    let eps = 1e-6;
    for i in 0..n {
        let at = |d: f64| {
            let mut v = xv.clone();
            v[i] += d;
            scalar(&f(&Tensor::from_vec(v, shape, &Device::Cpu).expect("x")))
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (fd - g[i]).abs() <= 1e-6 * fd.abs().max(1.0),
            "{name}[{i}]: autograd {} vs finite difference {fd}",
            g[i]
        );
    }
}

#[test]
fn gradients_flow_through_norm_softmax_and_rope() {
    let weight = Tensor::new(&[1.1f64, 0.9, 1.3, 0.7, 1.0, 1.2], &Device::Cpu).expect("w");
    check_op(
        "rms_norm",
        |x| ops::rms_norm(x, &weight, 1e-5).expect("op"),
        (2, 3, 6),
    );
    check_op(
        "softmax",
        |x| ops::softmax_last_dim(x).expect("op"),
        (2, 3, 6),
    );
    check_op(
        "log_softmax",
        |x| ops::log_softmax_last_dim(x).expect("op"),
        (2, 3, 6),
    );
    check_op("silu", |x| ops::silu(x).expect("op"), (2, 3, 6));
    let tables =
        ops::RopeTables::new(&[1.0, 0.1, 0.01], 4, 3, DType::F64, &Device::Cpu).expect("tables");
    check_op("rope", |x| ops::rope(x, &tables).expect("op"), (2, 3, 6));
    // The masked softmax the attention uses: -inf entries get probability and gradient 0.
    let mask = ops::causal_mask(3, 1, DType::F64, &Device::Cpu).expect("mask");
    check_op(
        "masked softmax",
        |x| {
            let x = x.narrow(2, 0, 4).expect("narrow");
            let p = ops::softmax_last_dim(&x.broadcast_add(&mask).expect("add")).expect("op");
            Tensor::cat(
                &[&p, &p.zeros_like().expect("z").narrow(2, 0, 2).expect("n")],
                2,
            )
            .expect("cat")
        },
        (2, 3, 6),
    );
}

#[test]
fn base_weights_receive_no_gradient() {
    let (_d, model) = tiny_model(&TinySpec::default(), GgmlDType::F32);
    let train =
        TrainModel::from_llama(&model, &Device::Cpu, TrainOptions::default()).expect("train model");
    let adapter = TrainAdapter::new(
        model.config(),
        Some(&lora_all(2)),
        Some(&prefix(2)),
        DType::F32,
        &Device::Cpu,
    )
    .expect("adapter");
    randomise_lora_b(&adapter, 0.1, 14);
    let grads = loss(&train, &adapter).backward().expect("backward");
    let frozen = train.frozen_tensors();
    assert!(!frozen.is_empty());
    for t in &frozen {
        assert!(!t.is_variable(), "a base tensor is a variable");
        assert!(grads.get(t).is_none(), "a base tensor received a gradient");
    }
    for (name, var) in adapter.named_vars() {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "{name} received no gradient"
        );
    }
}

#[test]
fn quantized_base_matches_serving_and_backpropagates_through_dequantised_weight() {
    let spec = TinySpec::default();
    let (_d, model) = tiny_model(&spec, GgmlDType::Q8_0);
    let opts = TrainOptions {
        quantized_base: true,
        ..TrainOptions::default()
    };
    let train = TrainModel::from_llama(&model, &Device::Cpu, opts).expect("train model");
    let adapter = TrainAdapter::new(
        model.config(),
        Some(&lora_all(4)),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .expect("adapter");
    randomise_lora_b(&adapter, 0.1, 15);
    let hook = adapter.to_weights(model.config()).expect("snapshot");
    let tokens: &[u32] = &[1, 5, 9, 33, 2, 70];
    let got: Vec<f32> = train
        .forward(&[tokens], Some(&adapter))
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward");
    let want = serving_logits(&model, tokens, Some(&hook));
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "quantized base vs serving: {diff}");

    // The op's backward is grad_y · dequant(W): the same gradient a dense matmul gives.
    let w = &model.weights().layers[0].down.weight;
    let (rows, cols) = (w.rows(), w.cols());
    let dense = Tensor::from_vec(w.to_f32(), (rows, cols), &Device::Cpu).expect("dense");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let xv: Vec<f32> = (0..5 * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let rv: Vec<f32> = (0..5 * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let r = Tensor::from_vec(rv, (5, rows), &Device::Cpu).expect("r");
    let x = Var::from_vec(xv, (5, cols), &Device::Cpu).expect("x");
    let grad_of = |y: Tensor| {
        let g = (y * &r)
            .and_then(|t| t.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        g.get(x.as_tensor())
            .expect("gradient reaches x")
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("vec")
    };
    let q = grad_of(
        x.as_tensor()
            .apply_op1(QMatMulOp::new(w.clone()))
            .expect("qmatmul"),
    );
    let d = grad_of(
        x.as_tensor()
            .matmul(&dense.t().expect("t"))
            .expect("matmul"),
    );
    assert!(
        max_abs_diff(&q, &d) < 1e-5,
        "qmatmul backward differs from dense"
    );
}

/// The fused quantized projection + LoRA op computes the base op's output plus the LoRA
/// delta, bit for bit, and the gradients of the three separate nodes. Its base gradient is
/// split by column over the pool (odd widths and a single block exercise uneven splits).
#[test]
fn fused_quantized_lora_linear_equals_base_op_plus_delta() {
    let spec = TinySpec::default();
    let (_d, model) = tiny_model(&spec, GgmlDType::Q8_0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let layer = &model.weights().layers[0];
    for w in [&layer.down.weight, &layer.o.weight] {
        let (rows, cols, r, m) = (w.rows(), w.cols(), 3, 7);
        let mut var = |shape: (usize, usize)| {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            Var::from_vec(v, shape, &Device::Cpu).expect("var")
        };
        let (x, a, b, probe) = (
            var((m, cols)),
            var((r, cols)),
            var((rows, r)),
            var((m, rows)),
        );
        let scale = 0.75;
        let fused = x
            .as_tensor()
            .apply_op3(
                a.as_tensor(),
                b.as_tensor(),
                QLoraLinear::new(QMatMulOp::new(w.clone()), scale),
            )
            .expect("fused");
        let base = x
            .as_tensor()
            .apply_op1(QMatMulOp::new(w.clone()))
            .expect("base");
        let delta = x
            .as_tensor()
            .apply_op3(a.as_tensor(), b.as_tensor(), LoraDelta { scale })
            .expect("delta");
        let separate = (base + delta).expect("sum");
        let values = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
        assert_eq!(values(&fused), values(&separate), "forward differs");
        let grads = |y: &Tensor| {
            let g = (y * probe.as_tensor())
                .and_then(|t| t.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            [&x, &a, &b].map(|v| values(g.get(v.as_tensor()).expect("gradient")))
        };
        for (name, (f, s)) in ["x", "A", "B"]
            .iter()
            .zip(grads(&fused).iter().zip(&grads(&separate)))
        {
            let diff = max_abs_diff(f, s);
            assert!(diff < 1e-4, "gradient of {name} differs by {diff}");
        }
    }
}

/// The fused head + log-softmax op gives the two separate ops' values bit for bit and their
/// gradient, masked rows (zero gradient) included, and again on a second backward.
#[test]
fn fused_head_log_softmax_equals_head_then_log_softmax_gather() {
    let spec = TinySpec::default();
    let (_d, model) = tiny_model(&spec, GgmlDType::Q8_0);
    let head = &model.weights().lm_head;
    let (vocab, hidden, rows) = (head.rows(), head.cols(), 6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let xv: Vec<f32> = (0..rows * hidden)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let x = Var::from_vec(xv, (rows, hidden), &Device::Cpu).expect("x");
    let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    // Rows 2 and 5 are masked out by a zero weight.
    let weights = Tensor::new(&[1.0f32, 0.5, 0.0, -2.0, 1.5, 0.0], &Device::Cpu).expect("w");
    let fused = x
        .as_tensor()
        .apply_op1(HeadLogSoftmax::new(
            QMatMulOp::new(head.clone()),
            targets.clone(),
        ))
        .expect("fused");
    let separate = x
        .as_tensor()
        .apply_op1(QMatMulOp::new(head.clone()))
        .and_then(|l| l.apply_op1(LogSoftmaxGather::new(targets.clone())))
        .expect("separate");
    let values = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("v");
    assert_eq!(values(&fused), values(&separate), "forward differs");
    let grad = |y: &Tensor| {
        let g = (y * &weights)
            .and_then(|t| t.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        values(g.get(x.as_tensor()).expect("gradient"))
    };
    let want = grad(&separate);
    let got = grad(&fused);
    assert!(max_abs_diff(&got, &want) < 1e-5, "gradient differs");
    assert!(
        max_abs_diff(&grad(&fused), &want) < 1e-5,
        "second backward differs"
    );
}

#[test]
fn serving_snapshot_of_a_fresh_lora_is_the_base_model() {
    let (_d, model) = tiny_model(&TinySpec::default(), GgmlDType::F32);
    let adapter = TrainAdapter::new(
        model.config(),
        Some(&lora_all(4)),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .expect("adapter");
    let hook = adapter.to_weights(model.config()).expect("snapshot");
    let tokens: &[u32] = &[3, 1, 4, 1, 5];
    let base = serving_logits(&model, tokens, None);
    let with = serving_logits(&model, tokens, Some(&hook));
    assert_eq!(
        base, with,
        "PEFT init (B = 0) must leave the model unchanged"
    );
}

#[test]
fn prompt_cache_gives_the_same_logprobs_and_gradients_as_full_sequences() {
    let (_d, model) = tiny_model(&TinySpec::default(), GgmlDType::F32);
    let opts = TrainOptions {
        dtype: DType::F64,
        ..TrainOptions::default()
    };
    let train = TrainModel::from_llama(&model, &Device::Cpu, opts).expect("train model");
    let adapter = TrainAdapter::new(
        model.config(),
        Some(&lora_all(2)),
        Some(&prefix(2)),
        DType::F64,
        &Device::Cpu,
    )
    .expect("adapter");
    randomise_lora_b(&adapter, 0.1, 16);
    let prompt: &[u32] = &[1, 5, 9, 33];
    let chosen: &[u32] = &[2, 70, 11];
    let rejected: &[u32] = &[60];

    // Reference: each pair member run in full, its completion positions summed.
    let full_c = [prompt, chosen].concat();
    let full_r = [prompt, rejected].concat();
    let lp = train
        .token_logprobs(&[&full_c, &full_r], Some(&adapter))
        .expect("full");
    // Completion token k of a pair member is scored at position (prompt length - 1 + k).
    let p = prompt.len() - 1;
    let margin = |c: &Tensor, r: &Tensor| -> Tensor {
        (c.sum_all().and_then(|c| c - r.sum_all()?)).expect("margin")
    };
    let row = |t: &Tensor, i: usize, start: usize, len: usize| -> Tensor {
        t.get(i).and_then(|r| r.narrow(0, start, len)).expect("row")
    };
    let full_loss = margin(
        &row(&lp, 0, p, chosen.len()),
        &row(&lp, 1, p, rejected.len()),
    );
    let full = scalar(&full_loss);
    let full_grads = full_loss.backward().expect("backward");

    let cache = train.prompt_cache(prompt, Some(&adapter)).expect("cache");
    assert_eq!(cache.len(), 2 + prompt.len());
    let cont = train
        .continuation_logprobs(&cache, &[chosen, rejected], Some(&adapter))
        .expect("continuations");
    assert_eq!(cont.dims2().expect("dims"), (2, chosen.len()));
    let rows = cont.to_vec2::<f64>().expect("vec");
    assert_eq!(
        rows[1][1..],
        [0.0, 0.0],
        "past the end of the shorter continuation"
    );
    let cached = rows[0].iter().sum::<f64>() - rows[1].iter().sum::<f64>();
    assert!((cached - full).abs() < 1e-10, "margin {cached} vs {full}");

    let cached_loss = margin(
        &row(&cont, 0, 0, chosen.len()),
        &row(&cont, 1, 0, rejected.len()),
    );
    let cached_grads = cached_loss.backward().expect("backward");
    for (name, var) in adapter.named_vars() {
        let g = |store: &candle_core::backprop::GradStore| {
            store
                .get(var.as_tensor())
                .expect("gradient")
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .expect("vec")
        };
        let (a, b) = (g(&full_grads), g(&cached_grads));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1e-8))
            .fold(0.0, f64::max);
        assert!(worst < 1e-8, "{name}: gradients differ by {worst:e}");
    }
}

/// SmolLM2-135M (Q4_1): the real shapes (9 query heads over 3 key/value heads, head_dim 64,
/// tied head, rope base 1e5) that tiny models do not cover.
fn real_model(dequantize: bool) -> Llama {
    let file = GgufFile::open(&prefix_rft_engine::testing::default_model_path()).expect("open");
    Llama::from_gguf(
        &file,
        LoadOptions {
            dequantize,
            ..Default::default()
        },
    )
    .expect("load")
}

fn real_adapter(model: &Llama) -> TrainAdapter {
    let lora = LoraConfig {
        targets: vec![Proj::Q, Proj::V, Proj::Down],
        ..lora_all(4)
    };
    let adapter = TrainAdapter::new(
        model.config(),
        Some(&lora),
        Some(&prefix(2)),
        DType::F32,
        &Device::Cpu,
    )
    .expect("adapter");
    randomise_lora_b(&adapter, 0.01, 17);
    adapter
}

/// Arbitrary in-vocabulary tokens.
const REAL_TOKENS: &[u32] = &[504, 3575, 282, 4649, 314];

#[test]
fn real_model_dense_train_forward_matches_serving_with_lora_and_prefix() {
    let model = real_model(true);
    let train =
        TrainModel::from_llama(&model, &Device::Cpu, TrainOptions::default()).expect("train model");
    let adapter = real_adapter(&model);
    let hook = adapter.to_weights(model.config()).expect("snapshot");
    let got: Vec<f32> = train
        .forward(&[REAL_TOKENS], Some(&adapter))
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward");
    let want = serving_logits(&model, REAL_TOKENS, Some(&hook));
    let diff = max_abs_diff(&got, &want);
    eprintln!("SmolLM2 dequantized: max |train − serving| {diff:e}");
    assert!(diff < 1e-3, "max |Δ| {diff}");
}

/// With quantized weights both paths quantize activations to Q8_1 before every matmul, so an
/// ulp of difference in attention can flip a rounding and grow through 30 layers (the serving
/// forward itself differs that much between a full and an incremental run). A one-token
/// sequence has no attention mixing and pins the arithmetic exactly.
#[test]
fn real_model_quantized_base_matches_serving_and_gives_lora_gradients() {
    let model = real_model(false);
    let opts = TrainOptions {
        quantized_base: true,
        ..TrainOptions::default()
    };
    let train = TrainModel::from_llama(&model, &Device::Cpu, opts).expect("train model");
    let adapter = real_adapter(&model);
    let lora_only = TrainAdapter::new(
        model.config(),
        Some(&lora_all(4)),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .expect("adapter");
    randomise_lora_b(&lora_only, 0.01, 18);
    let hook = lora_only.to_weights(model.config()).expect("snapshot");
    let one = &REAL_TOKENS[..1];
    let got: Vec<f32> = train
        .forward(&[one], Some(&lora_only))
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .expect("forward");
    let want = serving_logits(&model, one, Some(&hook));
    let diff = max_abs_diff(&got, &want);
    eprintln!("SmolLM2 Q4_1, quantized base, one token: max |train − serving| {diff:e}");
    // The training path computes norms and the LoRA delta with candle ops, serving with its own
    // loops: their activations differ by ulps, and Q8 activation rounding in 30 layers turns
    // that into logit differences of a few tenths (the quantized model is chaotic at the ulp
    // level, see engine/tests/reference.rs). So: the same prediction and a bounded gap; the
    // exact match is pinned by the dense path above.
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
            .0
    };
    assert_eq!(
        argmax(&got),
        argmax(&want),
        "train and serving predict different tokens"
    );
    assert!(diff < 1.0, "max |Δ| {diff}");

    let loss = train
        .token_logprobs(&[REAL_TOKENS], Some(&adapter))
        .expect("logprobs");
    let grads = loss.sum_all().and_then(|l| l.backward()).expect("backward");
    for (name, var) in adapter.named_vars() {
        let g = grads.get(var.as_tensor()).expect("gradient");
        let norm = scalar(&g.sqr().and_then(|x| x.sum_all()).expect("norm"));
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}
