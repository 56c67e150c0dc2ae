//! The DPO objective against TRL: on the real SmolLM2 GGUF, with the committed PEFT adapter as
//! the initial adapter and the bare base as the reference, the trainer's completion
//! log-probabilities, loss and LoRA gradients for one batch of two preference pairs equal what
//! TRL's `DPOTrainer` with PEFT computed on the same token ids (fixtures/trl_dpo, written by
//! `scripts/gen-fixtures trl_dpo`).
//!
//! TRL runs transformers on the GGUF dequantised to f32. With a dense f32 base we hold exactly
//! those weights, so only f32 summation order differs: about 1e-5 relative on log-probability
//! sums and the loss, 1e-3 on the gradient of a single small tensor. That comparison pins the
//! objective; a wrong sign, β or LoRA scale is off by orders of magnitude more. With the
//! quantized base (what a job uses) the base matmuls run the serving kernels, which quantize
//! activations to 8 bits as llama.cpp does; that alone moves a token's log-probability by ~0.06
//! nats (engine/tests/reference.rs), so sums over ~15 tokens differ by tenths of a nat and
//! single tensors' gradients by up to ~25%. Its bounds are set from that noise and still
//! separate a wrong sign or a doubled β on the loss.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use prefix_rft_adapters::peft::{self, Limits};
use prefix_rft_engine::model::AdapterWeights;
use prefix_rft_engine::testing::default_model_path;
use prefix_rft_engine::train::TrainModel;
use prefix_rft_trainer::job::load_model;
use prefix_rft_trainer::train::{
    adapter_from_weights, BatchGradients, Dataset, Pair, PairLogps, Reference, TrainParams, Trainer,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Fixture {
    beta: f64,
    loss: f64,
    pairs: Vec<FixturePair>,
    grad_norm: f64,
    tensors: BTreeMap<String, FixtureTensor>,
    full_grads: BTreeMap<String, Vec<f64>>,
}

#[derive(Debug, Deserialize)]
struct FixturePair {
    prompt_ids: Vec<u32>,
    chosen_ids: Vec<u32>,
    rejected_ids: Vec<u32>,
    policy_chosen_logp: f64,
    policy_rejected_logp: f64,
    reference_chosen_logp: f64,
    reference_rejected_logp: f64,
    chosen_reward: f64,
    rejected_reward: f64,
}

#[derive(Debug, Deserialize)]
struct FixtureTensor {
    shape: Vec<usize>,
    norm: f64,
    dot_init: f64,
}

/// How closely each quantity must agree with TRL (as a bound), or how closely it did (the
/// worst error seen, printed so the bounds can be re-derived).
#[derive(Debug, Default, Clone, Copy)]
struct Tolerances {
    /// |Δ| of a sequence's summed log-probability, in nats.
    logp: f64,
    /// |Δ| of a completion's `ρ` (policy minus reference) and of a pair's `ρ_w − ρ_l`, in nats.
    margin: f64,
    /// |Δ| of the loss.
    loss: f64,
    /// Relative error of the global gradient norm.
    grad_norm_rel: f64,
    /// Relative error of each tensor's gradient norm.
    tensor_norm_rel: f64,
    /// |Δ ⟨g, θ₀⟩| over `‖g‖·‖θ₀‖`, per tensor.
    dot_rel: f64,
    /// `‖g − g_trl‖ / ‖g_trl‖` of the tensors written in full.
    full_rel: f64,
}

/// Dense f32 base: the weights transformers uses, different summation order only. Measured
/// (x86-64, 2 threads; worst over the batch and the 300 tensors): logp 1.7e-3 (on −48.9),
/// margin 3.9e-4, loss 1.1e-5, global norm 7e-6, tensor norm 9.0e-4, dot 7.4e-5, full
/// 5.9e-4. Bounds are 3-5x those (14x for the global norm, which averages over 300 tensors).
/// A doubled β moves the loss by 0.12, swapping chosen and rejected by 0.17, the LoRA scale α
/// instead of α/r the log-probabilities by nats.
const DENSE: Tolerances = Tolerances {
    logp: 5e-3,
    margin: 1.5e-3,
    loss: 5e-5,
    grad_norm_rel: 1e-4,
    tensor_norm_rel: 3e-3,
    dot_rel: 3e-4,
    full_rel: 2e-3,
};

/// Quantized base, activations quantized to 8 bits by the serving kernels. Measured: logp
/// 0.49 (on −52.9), margin 0.81, loss 0.023, global norm 0.043, tensor norm 0.24 (a tensor
/// whose gradient norm is 0.01), dot 0.021, full 0.19. That is the quantized arithmetic, not
/// the objective: llama.cpp on the same file puts the four reference sums up to 0.76 nats from
/// TRL's and 0.87 from ours (checked by hand). Bounds are about 2x the measured: loose per
/// tensor, but the loss bound still separates a doubled β (0.12) and swapped pairs (0.17),
/// and a gradient of the wrong sign or twice the size fails the gradient bounds.
const QUANTIZED: Tolerances = Tolerances {
    logp: 1.0,
    margin: 1.6,
    loss: 0.05,
    grad_norm_rel: 0.1,
    tensor_norm_rel: 0.5,
    dot_rel: 0.05,
    full_rel: 0.4,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_dpo")
}

fn read_fixture() -> Fixture {
    let text = std::fs::read_to_string(fixture_dir().join("fixture.json")).expect("fixture.json");
    serde_json::from_str(&text).expect("parse fixture.json")
}

fn dataset(f: &Fixture) -> Dataset {
    let pairs = f
        .pairs
        .iter()
        .map(|p| Pair {
            prompt: p.prompt_ids.clone(),
            chosen: p.chosen_ids.clone(),
            rejected: p.rejected_ids.clone(),
        })
        .collect();
    Dataset {
        pairs,
        ..Dataset::default()
    }
}

/// The committed PEFT adapter, read as any uploaded adapter is.
fn initial_adapter(model: &TrainModel) -> AdapterWeights {
    let adapter = peft::load_dir(
        &fixture_dir().join("adapter"),
        model.config(),
        &Limits::default(),
    )
    .expect("load the fixture adapter");
    let lora = adapter.lora.expect("a LoRA adapter");
    assert_eq!((lora.rank, lora.alpha, lora.rslora), (2, 4.0, false));
    adapter.weights
}

/// A first version's trainer: the given initial values, the bare base as reference.
fn trainer<'m>(model: &'m TrainModel, weights: &AdapterWeights, beta: f64) -> Trainer<'m> {
    let adapter = adapter_from_weights(model, weights).expect("trainable adapter");
    let params = TrainParams {
        beta,
        ..TrainParams::default()
    };
    Trainer::new(model, adapter, Reference::Base, params).expect("trainer")
}

fn pair_logps(trainer: &Trainer<'_>, data: &Dataset) -> Vec<PairLogps> {
    data.pairs
        .iter()
        .map(|p| trainer.pair_logps(p).expect("pair log-probabilities"))
        .collect()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor values")
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The fixture adapter's initial value of tensor `name` (`model.layers.N.….lora_X.weight`).
fn initial_value(trainer: &Trainer<'_>, name: &str) -> Vec<f64> {
    let (_, var) = trainer
        .adapter()
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no variable {name}"));
    to_f64(var.as_tensor())
}

/// The worst errors seen, in the same units as the bounds.
type Worst = Tolerances;

fn check_logps(f: &Fixture, ours: &[PairLogps], tol: Tolerances, worst: &mut Worst) {
    assert_eq!(ours.len(), f.pairs.len());
    for (i, (want, got)) in f.pairs.iter().zip(ours).enumerate() {
        let rows = [
            ("policy chosen", want.policy_chosen_logp, got.policy_chosen),
            (
                "policy rejected",
                want.policy_rejected_logp,
                got.policy_rejected,
            ),
            (
                "reference chosen",
                want.reference_chosen_logp,
                got.reference_chosen,
            ),
            (
                "reference rejected",
                want.reference_rejected_logp,
                got.reference_rejected,
            ),
        ];
        for (what, w, g) in rows {
            let err = (g - w).abs();
            worst.logp = worst.logp.max(err);
            assert!(err <= tol.logp, "pair {i} {what}: ours {g}, TRL {w}");
        }
        // ρ = policy − reference per completion: TRL's reward is β·ρ, its margin ρ_w − ρ_l.
        let rho_w = got.policy_chosen - got.reference_chosen;
        let rho_l = got.policy_rejected - got.reference_rejected;
        for (what, w, rho) in [
            ("chosen", want.chosen_reward, rho_w),
            ("rejected", want.rejected_reward, rho_l),
        ] {
            let err = (f.beta * rho - w).abs() / f.beta;
            worst.margin = worst.margin.max(err);
            assert!(
                err <= tol.margin,
                "pair {i} {what} reward: ours {}, TRL {w}",
                f.beta * rho
            );
        }
        let want_m = (want.chosen_reward - want.rejected_reward) / f.beta;
        let err = (rho_w - rho_l - want_m).abs();
        worst.margin = worst.margin.max(err);
        assert!(
            err <= tol.margin,
            "pair {i}: margin ours {}, TRL {want_m}",
            rho_w - rho_l
        );
    }
}

fn check_gradients(
    f: &Fixture,
    trainer: &Trainer<'_>,
    ours: &BatchGradients,
    tol: Tolerances,
    worst: &mut Worst,
) {
    let loss_err = (ours.loss - f.loss).abs();
    worst.loss = loss_err;
    assert!(
        loss_err <= tol.loss,
        "loss ours {}, TRL {}",
        ours.loss,
        f.loss
    );

    let grads: BTreeMap<&str, Vec<f64>> = ours
        .grads
        .iter()
        .map(|(n, g)| (n.as_str(), to_f64(g)))
        .collect();
    let names: Vec<&str> = f.tensors.keys().map(String::as_str).collect();
    assert_eq!(
        grads.keys().copied().collect::<Vec<_>>(),
        names,
        "the trainable tensors are PEFT's"
    );

    let global = grads.values().map(|g| norm(g).powi(2)).sum::<f64>().sqrt();
    worst.grad_norm_rel = (global - f.grad_norm).abs() / f.grad_norm;
    assert!(
        worst.grad_norm_rel <= tol.grad_norm_rel,
        "global gradient norm ours {global}, TRL {}",
        f.grad_norm
    );

    for (name, want) in &f.tensors {
        let g = &grads[name.as_str()];
        assert_eq!(g.len(), want.shape.iter().product::<usize>(), "{name}");
        let n = norm(g);
        let rel = (n - want.norm).abs() / want.norm;
        worst.tensor_norm_rel = worst.tensor_norm_rel.max(rel);
        assert!(
            rel <= tol.tensor_norm_rel,
            "{name}: gradient norm ours {n}, TRL {}",
            want.norm
        );
        let theta = initial_value(trainer, name);
        let scale = want.norm * norm(&theta);
        let d = dot(g, &theta);
        let rel = (d - want.dot_init).abs() / scale;
        worst.dot_rel = worst.dot_rel.max(rel);
        assert!(
            rel <= tol.dot_rel,
            "{name}: <g, θ₀> ours {d}, TRL {} (‖g‖‖θ₀‖ = {scale})",
            want.dot_init
        );
    }

    for (name, want) in &f.full_grads {
        let g = &grads[name.as_str()];
        assert_eq!(g.len(), want.len(), "{name}");
        let diff: Vec<f64> = g.iter().zip(want).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(want);
        worst.full_rel = worst.full_rel.max(rel);
        assert!(rel <= tol.full_rel, "{name}: ‖g − g_trl‖/‖g_trl‖ = {rel}");
    }
}

/// The fixture must exercise what it claims to: a loss away from ln 2 (policy ≠ reference),
/// margins of both signs, gradient in every tensor, and the loss of a doubled β or of swapped
/// chosen and rejected outside the loss tolerance.
fn check_not_vacuous(f: &Fixture, tol: Tolerances) {
    let ln2 = std::f64::consts::LN_2;
    assert!((f.loss - ln2).abs() > tol.loss, "loss {}", f.loss);
    let margins: Vec<f64> = f
        .pairs
        .iter()
        .map(|p| {
            (p.policy_chosen_logp - p.reference_chosen_logp)
                - (p.policy_rejected_logp - p.reference_rejected_logp)
        })
        .collect();
    assert!(margins.iter().any(|&m| m > 0.5) && margins.iter().any(|&m| m < -0.5));
    assert!(f.tensors.values().all(|t| t.norm > 0.0));
    let loss = |beta: f64, sign: f64| {
        margins
            .iter()
            .map(|m| (1.0 + (-beta * sign * m).exp()).ln())
            .sum::<f64>()
            / margins.len() as f64
    };
    assert!(
        (loss(f.beta, 1.0) - f.loss).abs() <= 1e-6,
        "TRL's loss from TRL's log-probs"
    );
    assert!((loss(2.0 * f.beta, 1.0) - f.loss).abs() > 2.0 * tol.loss);
    assert!((loss(f.beta, -1.0) - f.loss).abs() > 2.0 * tol.loss);
}

fn matches_trl(quantized_base: bool, tol: Tolerances) {
    let f = read_fixture();
    check_not_vacuous(&f, tol);
    let data = dataset(&f);
    let model = load_model(&default_model_path(), quantized_base).expect("load the GGUF");
    let weights = initial_adapter(&model);
    let trainer = trainer(&model, &weights, f.beta);
    let mut worst = Worst::default();

    check_logps(&f, &pair_logps(&trainer, &data), tol, &mut worst);
    let grads = trainer.batch_gradients(&data).expect("batch gradients");
    check_gradients(&f, &trainer, &grads, tol, &mut worst);
    println!("quantized_base = {quantized_base}: worst errors {worst:?}");
}

#[test]
fn dpo_loss_and_gradients_match_trl_on_the_dequantized_base() {
    matches_trl(false, DENSE);
}

#[test]
fn dpo_loss_and_gradients_match_trl_on_the_quantized_base() {
    matches_trl(true, QUANTIZED);
}

/// The LoRA scale the PEFT file implies (`lora_alpha / r` = 2) is the one that matches TRL:
/// the adapter read with `lora_alpha` alone as the scale (the `/ r` forgotten) moves the
/// policy log-probabilities far outside even the quantized bound.
#[test]
fn a_wrong_lora_scale_does_not_match_trl() {
    let f = read_fixture();
    let data = dataset(&f);
    let model = load_model(&default_model_path(), false).expect("load the GGUF");
    let weights = initial_adapter(&model);
    let lora = weights
        .lora()
        .map(|(&key, l)| {
            let mut l = l.clone();
            assert_eq!(l.scale, 2.0);
            l.scale *= l.rank as f32;
            (key, l)
        })
        .collect();
    let wrong = AdapterWeights::new(model.config(), lora, None).expect("weights");
    let ours = pair_logps(&trainer(&model, &wrong, f.beta), &data);
    let worst = f
        .pairs
        .iter()
        .zip(&ours)
        .flat_map(|(w, g)| {
            [
                (g.policy_chosen - w.policy_chosen_logp).abs(),
                (g.policy_rejected - w.policy_rejected_logp).abs(),
            ]
        })
        .fold(0.0, f64::max);
    println!("scale α instead of α/r: worst |Δ logp| {worst}");
    assert!(
        worst > 3.0 * QUANTIZED.logp,
        "scale α instead of α/r moved the log-probabilities by only {worst}"
    );
}
