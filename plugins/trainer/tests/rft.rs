//! Prefix-guided RFT's pieces on a tiny GGUF: the hybrid rollout forces the demonstration's
//! prefix, rollouts stop at stop tokens, and one gradient step on the PPO-clip loss moves the
//! policy towards the rewarded rollout and away from the others.

use prefix_rft_engine::model::Proj;
use prefix_rft_engine::quant::GgmlDType;
use prefix_rft_engine::testing::{tiny_weights, write_tiny_gguf, TinySpec};
use prefix_rft_engine::train::{LoraConfig, TrainAdapter, TrainModel};
use prefix_rft_trainer::job::load_model;
use prefix_rft_trainer::rft::{group_loss, sample_group, Policy, RftParams, Rollout};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn model() -> (tempfile::TempDir, TrainModel) {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = TinySpec::default();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &spec, &tiny_weights(&spec, 7), GgmlDType::Q8_0);
    let m = load_model(&path, true).expect("model");
    (dir, m)
}

fn adapter(m: &TrainModel) -> TrainAdapter {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        targets: Proj::ALL.to_vec(),
        seed: 3,
    };
    TrainAdapter::new(m.config(), Some(&lora), None, m.dtype(), m.device()).expect("adapter")
}

const PROMPT: [u32; 3] = [21, 22, 23];
const DEMO: [u32; 6] = [11, 12, 13, 14, 15, 16];

#[test]
fn the_hybrid_forces_the_prefix_and_free_rollouts_sample() {
    let (_dir, m) = model();
    let a = adapter(&m);
    let params = RftParams {
        group: 4,
        max_new_tokens: 5,
        ..RftParams::default()
    };
    let policy = Policy {
        model: &m,
        adapter: &a,
    };
    let sample = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        sample_group(policy, &PROMPT, &DEMO, 3, &params, &mut rng).expect("group")
    };
    let group = sample(1);
    assert_eq!(group.len(), 4);
    assert_eq!(group[0].forced, 3);
    assert_eq!(&group[0].tokens[..3], &DEMO[..3]);
    assert_eq!(
        group[0].tokens.len(),
        3 + 5,
        "the hybrid samples max_new_tokens after it"
    );
    for r in &group[1..] {
        assert_eq!((r.forced, r.tokens.len()), (0, 5));
        assert!(r.tokens.iter().all(|&t| (t as usize) < 96));
    }
    // Seeded: the same rng seed gives the same group.
    let again = sample(1);
    assert_eq!(group, again);
    // Every token is a stop token: each free rollout ends after its first sampled token.
    let stop_all = RftParams {
        stop_tokens: (0..96).collect(),
        ..params
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let short = sample_group(policy, &PROMPT, &DEMO, 2, &stop_all, &mut rng).expect("group");
    assert_eq!(
        short[0].tokens.len(),
        3,
        "the forced prefix does not count as stopping"
    );
    assert!(short[1..].iter().all(|r| r.tokens.len() == 1));
}

fn logp(m: &TrainModel, a: &TrainAdapter, completion: &[u32]) -> f64 {
    let seq = [&PROMPT[..], completion].concat();
    let lp = m.token_logprobs(&[&seq], Some(a)).expect("logprobs");
    let v: Vec<f32> = lp.get(0).expect("row").to_vec1().expect("vec");
    v[PROMPT.len() - 1..].iter().map(|&x| f64::from(x)).sum()
}

#[test]
fn a_step_on_the_loss_favours_the_rewarded_rollout() {
    let (_dir, m) = model();
    let a = adapter(&m);
    let params = RftParams::default();
    let rollouts = vec![
        Rollout {
            tokens: DEMO[..4].to_vec(),
            forced: 2,
        },
        Rollout {
            tokens: vec![60, 61, 62, 63],
            forced: 0,
        },
        Rollout {
            tokens: vec![70, 71, 72],
            forced: 0,
        },
    ];
    let before: Vec<f64> = rollouts.iter().map(|r| logp(&m, &a, &r.tokens)).collect();
    // Equal rewards: nothing to learn.
    let flat = group_loss(
        Policy {
            model: &m,
            adapter: &a,
        },
        &PROMPT,
        &rollouts,
        vec![0.5; 3],
        &params,
    )
    .expect("loss");
    assert!(flat.loss.is_none());
    let g = group_loss(
        Policy {
            model: &m,
            adapter: &a,
        },
        &PROMPT,
        &rollouts,
        vec![1.0, 0.0, 0.0],
        &params,
    )
    .expect("loss");
    let loss = g.loss.expect("a loss");
    let grads = loss.backward().expect("backward");
    let vars = a.vars();
    let mut moved = 0.0;
    for v in &vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            moved += g
                .sqr()
                .and_then(|x| x.sum_all())
                .and_then(|x| x.to_scalar::<f32>())
                .expect("norm");
            let next = (v.as_tensor() - g.affine(0.05, 0.0).expect("scale")).expect("step");
            v.set(&next).expect("set");
        }
    }
    assert!(moved > 0.0, "the loss reaches the adapter");
    let after: Vec<f64> = rollouts.iter().map(|r| logp(&m, &a, &r.tokens)).collect();
    assert!(
        after[0] > before[0],
        "the rewarded hybrid gains: {before:?} → {after:?}"
    );
    assert!(
        after[1] + after[2] < before[1] + before[2],
        "the unrewarded rollouts lose: {before:?} → {after:?}"
    );
}
