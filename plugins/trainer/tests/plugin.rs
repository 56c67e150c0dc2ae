//! The trainer plugin through the `Plugin` trait, in process, on a tiny GGUF: it trains,
//! reports progress, writes PEFT files the adapters crate loads, continues from a parent, and
//! refuses bad requests and honours cancellation with the ABI's error codes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use prefix_rft_adapters::peft::{self, AdapterKind, Limits};
use prefix_rft_engine::quant::GgmlDType;
use prefix_rft_engine::testing::{tiny_weights, write_tiny_gguf, TinySpec};
use prefix_rft_plugin_abi::{CallContext, Plugin, PluginError};
use prefix_rft_trainer::TrainerPlugin;
use serde_json::{json, Value};

fn write_model(dir: &Path) -> std::path::PathBuf {
    let spec = TinySpec::default();
    let path = dir.join("tiny.gguf");
    write_tiny_gguf(&path, &spec, &tiny_weights(&spec, 7), GgmlDType::Q8_0);
    path
}

/// Pairs whose chosen answers use low token ids and rejected ones high ids.
fn pairs(n: u32) -> Value {
    let rows: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "prompt": [20 + i, 30 + (i * 7) % 20, 41],
                "chosen": [10 + i % 5, 12, 14 + i % 3],
                "rejected": [50 + i % 5, 57, 55 + i % 3],
            })
        })
        .collect();
    Value::Array(rows)
}

fn request(model: &Path, out: &Path, extra: Value) -> Value {
    let mut r = json!({
        "base_model": model,
        "kind": "lora",
        "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {
            "pairs": pairs(6),
            "demonstrations": [{"prompt": [21, 22], "completion": [11, 12, 13]}],
            "negatives": [{"prompt": [23, 24], "completion": [52, 53]}],
            "eval_pairs": pairs(3),
        },
        "params": {"steps": 12, "batch_size": 4, "lr": 0.005, "beta": 0.5, "seed": 1},
        "out_dir": out,
    });
    if let (Some(r), Value::Object(extra)) = (r.as_object_mut(), extra) {
        r.extend(extra);
    }
    r
}

fn run(request: Value, cancel: &AtomicBool) -> (Result<Value, PluginError>, Vec<(f64, Value)>) {
    let seen = Mutex::new(Vec::new());
    let progress = |f: f64, detail: &[u8]| {
        let v: Value = serde_json::from_slice(detail).unwrap_or(Value::Null);
        if let Ok(mut s) = seen.lock() {
            s.push((f, v));
        }
    };
    let ctx = CallContext::native(cancel, Some(&progress), None);
    let out = TrainerPlugin.run(request, &ctx);
    (out, seen.into_inner().unwrap_or_default())
}

#[test]
fn trains_writes_peft_files_and_continues_from_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path());
    let out = dir.path().join("v1");
    let never = AtomicBool::new(false);
    let (reply, progress) = run(request(&model, &out, json!({})), &never);
    let reply = reply.expect("run");

    assert_eq!(progress.len(), 12);
    assert_eq!(progress[11].0, 1.0);
    assert_eq!(progress[11].1["step"], 12);
    assert!(progress[0].1["loss"].as_f64().is_some_and(f64::is_finite));
    assert_eq!(reply["kind"], "lora");
    assert_eq!(
        reply["metrics"]["losses"].as_array().map(Vec::len),
        Some(12)
    );
    assert_eq!(reply["metrics"]["eval_held_out"], true);
    let before = reply["metrics"]["eval_before"]["reward_margin"].as_f64();
    let after = reply["metrics"]["eval_after"]["reward_margin"].as_f64();
    assert_eq!(before, Some(0.0));
    assert!(after.is_some_and(|m| m > 0.0), "{reply}");

    let cfg = TinySpec::default().config();
    let loaded = peft::load_dir(&out, &cfg, &Limits::default()).expect("PEFT files load");
    assert_eq!(loaded.kind(), AdapterKind::Lora);
    let lora = loaded.lora.clone().expect("lora params");
    assert_eq!(lora.rank, 4);
    assert_eq!(lora.alpha, 8.0);
    assert_eq!(loaded.weights.targets().len(), 3);
    assert!(
        loaded
            .weights
            .lora()
            .any(|(_, l)| l.b.iter().any(|&x| x != 0.0)),
        "training moved LoRA B away from zero"
    );

    // A next version starts from v1 and compares against it: zero implicit margin before
    // its first step, and exactly v1's log-prob margin.
    let out2 = dir.path().join("v2");
    let (reply2, _) = run(
        request(&model, &out2, json!({"parent": out, "kind": null})),
        &never,
    );
    let reply2 = reply2.expect("run from parent");
    assert_eq!(reply2["from_parent"], true);
    assert_eq!(
        reply2["metrics"]["eval_before"]["reward_margin"].as_f64(),
        Some(0.0)
    );
    assert_eq!(
        reply2["metrics"]["eval_before"]["logp_margin"],
        reply["metrics"]["eval_after"]["logp_margin"],
        "the child starts exactly where the parent ended"
    );
    peft::load_dir(&out2, &cfg, &Limits::default()).expect("v2 loads");
}

#[test]
fn trains_a_prefix_adapter() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path());
    let out = dir.path().join("p1");
    let never = AtomicBool::new(false);
    let req = request(
        &model,
        &out,
        json!({"kind": "prefix", "prefix": {"num_virtual_tokens": 2, "init_std": 0.1}}),
    );
    let reply = run(req, &never).0.expect("run");
    assert_eq!(reply["kind"], "prefix");
    let cfg = TinySpec::default().config();
    let loaded = peft::load_dir(&out, &cfg, &Limits::default()).expect("PEFT files load");
    assert_eq!(loaded.num_virtual_tokens, Some(2));
}

#[test]
fn cancellation_returns_the_cancelled_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path());
    let out = dir.path().join("never");
    let cancel = AtomicBool::new(false);
    let seen = Mutex::new(0usize);
    let progress = |_: f64, _: &[u8]| {
        if let Ok(mut n) = seen.lock() {
            *n += 1;
            if *n == 3 {
                cancel.store(true, Ordering::Release);
            }
        }
    };
    let ctx = CallContext::native(&cancel, Some(&progress), None);
    let err = TrainerPlugin
        .run(request(&model, &out, json!({})), &ctx)
        .expect_err("cancelled");
    assert_eq!(err.code.as_deref(), Some(PluginError::CANCELLED));
    assert_eq!(seen.lock().map(|n| *n).unwrap_or(0), 3);
    assert!(!out.exists(), "a cancelled job writes nothing");
}

#[test]
fn refuses_bad_requests_and_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path());
    let out = dir.path().join("x");
    let never = AtomicBool::new(false);
    let cases = [
        json!({"surprise": 1}),
        json!({"kind": "prefix"}),
        json!({"lora": {"rank": 0}}),
        json!({"lora": {"rank": 2, "target_modules": ["embed_tokens"]}}),
        json!({"params": {"lr": -1.0}}),
        json!({"data": {"pairs": [{"prompt": [1], "chosen": [], "rejected": [2]}]}}),
        json!({"data": {"pairs": [{"prompt": [-1], "chosen": [1], "rejected": [2]}]}}),
        json!({"data": {}}),
    ];
    for extra in cases {
        let err = run(request(&model, &out, extra.clone()), &never)
            .0
            .expect_err("refused");
        assert_eq!(
            err.code.as_deref(),
            Some(PluginError::INVALID_REQUEST),
            "{extra}: {err}"
        );
    }
    // A token outside the vocabulary (96) and a missing model fail without a panic.
    let bad_token = json!({"data": {"pairs": [{"prompt": [1], "chosen": [500], "rejected": [2]}]}});
    let err = run(request(&model, &out, bad_token), &never)
        .0
        .expect_err("refused");
    assert!(err.message.contains("500"), "{err}");
    assert_eq!(err.code.as_deref(), Some(PluginError::INVALID_REQUEST));
    let err = run(
        request(&dir.path().join("missing.gguf"), &out, json!({})),
        &never,
    )
    .0
    .expect_err("refused");
    assert!(err.message.contains("missing.gguf"), "{err}");

    let p = TrainerPlugin;
    assert!(p
        .validate_config(&json!({"kind": "lora", "lora": {"rank": 8}}))
        .is_ok());
    let err = p
        .validate_config(&json!({"kind": "lora+prefix"}))
        .expect_err("prefix without virtual tokens");
    assert_eq!(err.code.as_deref(), Some(PluginError::INVALID_CONFIG));
    assert!(p.validate_config(&json!({"params": {"nope": 1}})).is_err());
}

/// The host's `reward` service of these tests: the share of each completion's tokens below 20
/// (the "low ids" the chosen answers use), or `garbage` when asked to misbehave.
fn reward_service(garbage: bool) -> impl Fn(&str, &Value) -> Result<Value, String> + Sync {
    move |service, request| {
        assert_eq!(service, "reward");
        let completions = request["completions"].as_array().ok_or("no completions")?;
        if garbage {
            return Ok(json!({"scores": [0.5]}));
        }
        let scores: Vec<f64> = completions
            .iter()
            .map(|c| {
                let ids: Vec<u64> = c
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                    .collect();
                ids.iter().filter(|&&t| t < 20).count() as f64 / ids.len().max(1) as f64
            })
            .collect();
        Ok(json!({ "scores": scores }))
    }
}

fn rft_request(model: &Path, out: &Path) -> Value {
    request(
        model,
        out,
        json!({"rft": {"group": 3, "max_new_tokens": 4, "stop_tokens": [2]},
               "params": {"steps": 4, "batch_size": 4, "lr": 0.005, "beta": 0.5, "seed": 1}}),
    )
}

#[test]
fn rft_scores_rollouts_through_the_hosts_reward_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path());
    let never = AtomicBool::new(false);
    let service = reward_service(false);
    let ctx = CallContext::native(&never, None, Some(&service));
    let reply = TrainerPlugin
        .run(rft_request(&model, &dir.path().join("out")), &ctx)
        .expect("run");
    let rewards: Vec<f64> = reply["metrics"]["rft_rewards"]
        .as_array()
        .expect("rft_rewards")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert!(
        !rewards.is_empty(),
        "the demonstration was trained with RFT: {reply}"
    );
    assert!(
        rewards.iter().all(|r| (0.0..=1.0).contains(r)),
        "{rewards:?}"
    );
}

#[test]
fn rft_fails_the_run_with_the_reason_when_the_reward_is_unusable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = write_model(dir.path());
    let never = AtomicBool::new(false);
    let garbage = reward_service(true);
    for (host, expect) in [
        (
            Some(&garbage as &(dyn Fn(&str, &Value) -> Result<Value, String> + Sync)),
            "1 scores for 3 completions",
        ),
        (None, "no `reward` service"),
    ] {
        let ctx = CallContext::native(&never, None, host);
        let e = TrainerPlugin
            .run(rft_request(&model, &dir.path().join("out")), &ctx)
            .expect_err("the run fails");
        assert!(e.message.contains(expect), "{}", e.message);
    }
}
