//! Parity with Python PEFT (fixtures by `scripts/oracle/peft_adapters.py`): adapters made and
//! saved by PEFT on SmolLM2, loaded by us from the same files, give PEFT's teacher-forced
//! log-probs. With the base dequantised: top-1 agreement ≥ 99.5 % and mean |Δ log-prob|
//! ≤ 0.01. With the quantized base: the shift the adapter causes (adapter minus base log-prob
//! per token) matches PEFT's shift to a mean absolute difference ≤ 0.05 with f32 activations
//! (`[model] activations = "f32"`, weight-only quantization); with llama.cpp's int8 activations
//! it does not (see the bound below). Files we export from what we loaded read back to the same
//! weights and the same log-probs.

use std::path::PathBuf;

use prefix_rft_adapters::peft::{self, Limits};
use prefix_rft_adapters::testing::random_lora;
use prefix_rft_adapters::PeftAdapter;
use prefix_rft_engine::generate::score;
use prefix_rft_engine::model::{AdapterHook, AdapterWeights, LoadOptions, Proj};
use prefix_rft_engine::quant::Activations;
use prefix_rft_engine::testing::{default_model_path, json_floats, json_ids};
use prefix_rft_engine::LoadedModel;
use serde_json::Value;

const ADAPTERS: [&str; 4] = ["lora_r4_qv", "lora_r8_rslora_ko", "lora_r2_all", "prefix_8"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("logprobs.json")).expect("fixture");
    serde_json::from_str(&text).expect("fixture json")
}

fn load(dequantize: bool) -> LoadedModel {
    load_with(LoadOptions {
        dequantize,
        ..Default::default()
    })
}

fn load_with(opts: LoadOptions) -> LoadedModel {
    LoadedModel::load(&default_model_path(), opts).expect("model")
}

fn adapter(m: &LoadedModel, name: &str) -> PeftAdapter {
    peft::load_dir(&fixtures().join(name), m.model.config(), &Limits::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[derive(Default)]
struct Tally {
    n: usize,
    top1_same: usize,
    abs_diff: f64,
    shift_diff: f64,
}

#[test]
fn peft_adapters_match_peft_on_the_dequantized_and_quantized_base() {
    let r = reference();
    let texts = r["texts"].as_array().expect("texts");
    let mut results = Vec::new();
    let modes = [
        ("dequantized", true, Activations::Int8),
        ("Q4_1, f32 activations", false, Activations::F32),
        ("Q4_1, int8 activations", false, Activations::Int8),
    ];
    for (mode, dequantize, activations) in modes {
        let m = load_with(LoadOptions {
            dequantize,
            activations,
        });
        // Our base log-probs per text, shared by every adapter's shift.
        let base: Vec<Vec<f32>> = texts
            .iter()
            .map(|e| {
                score(&m, &json_ids(&e["tokens"]), None)
                    .expect("score base")
                    .0
            })
            .collect();
        for name in ADAPTERS {
            let a = adapter(&m, name);
            let hook = Some(&a.weights as &dyn AdapterHook);
            let mut t = Tally::default();
            for (k, entry) in texts.iter().enumerate() {
                let tokens = json_ids(&entry["tokens"]);
                let want = &entry["adapters"][name];
                let want_lp = json_floats(&want["logprobs"]);
                let want_top1 = json_ids(&want["top1"]);
                let want_shift: Vec<f64> = want_lp
                    .iter()
                    .zip(json_floats(&entry["base"]["logprobs"]))
                    .map(|(a, b)| a - b)
                    .collect();
                let (lp, top1) = score(&m, &tokens, hook).expect("score");
                let base_lp = &base[k];
                for i in 0..lp.len() {
                    t.n += 1;
                    t.top1_same += usize::from(top1[i] == want_top1[i]);
                    t.abs_diff += (lp[i] as f64 - want_lp[i]).abs();
                    let shift = lp[i] as f64 - base_lp[i] as f64;
                    t.shift_diff += (shift - want_shift[i]).abs();
                }
            }
            let n = t.n as f64;
            let (top1, mean, shift) = (t.top1_same as f64 / n, t.abs_diff / n, t.shift_diff / n);
            eprintln!(
                "{name} ({mode}): {} positions, top-1 {top1:.4}, mean |Δ lp| {mean:.4}, mean |Δ shift| {shift:.4}",
                t.n
            );
            // The weights in f32, or dequantized a tile at a time for f32 activations.
            let f32_arithmetic = dequantize || activations == Activations::F32;
            results.push((name, mode, f32_arithmetic, top1, mean, shift));
        }
    }
    for (name, mode, f32_arithmetic, top1, mean, shift) in results {
        if f32_arithmetic {
            // The reference's arithmetic up to summation order.
            assert!(top1 >= 0.995, "{name} ({mode}): top-1 agreement {top1}");
            assert!(mean <= 0.01, "{name} ({mode}): mean |Δ log-prob| {mean}");
            assert!(shift <= 0.05, "{name} ({mode}): mean |Δ shift| {shift}");
        } else {
            // Target 0.05 is NOT met with int8 activations: this path quantizes activations to
            // 8 bits per block before every matmul (llama.cpp's arithmetic), which moves each
            // token's log-prob by ~0.05 against the f32 reference on its own, independently in
            // the runs with and without the adapter, so the shift carries √2 of it. Measured
            // 0.068-0.079 (LoRA) and 0.127 (prefix, whose shift is ~1 nat); these bounds pin
            // that.
            let bound = if name.starts_with("prefix") {
                0.15
            } else {
                0.09
            };
            assert!(shift <= bound, "{name}: mean |Δ shift| {shift}");
        }
    }
}

#[test]
fn exported_files_read_back_to_the_same_adapter() {
    let m = load(false);
    let texts = reference()["texts"].as_array().expect("texts").clone();
    let tokens = json_ids(&texts[0]["tokens"]);
    for name in ADAPTERS {
        let a = adapter(&m, name);
        let files = peft::to_files(
            &a.weights,
            m.model.config(),
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        )
        .expect("export");
        let back = peft::parse(
            &files.config,
            &files.weights,
            m.model.config(),
            &Limits::default(),
        )
        .expect("re-import");
        assert_eq!(back.kind(), a.kind());
        // Dev-time: `PEFT_EXPORT_DIR=dir cargo test ...` keeps the exports for
        // `scripts/oracle/peft_adapters.py --check dir/<name> <name>` (Python PEFT loads them).
        if let Some(dir) = std::env::var_os("PEFT_EXPORT_DIR") {
            let out = PathBuf::from(dir).join(name);
            std::fs::create_dir_all(&out).expect("export dir");
            std::fs::write(out.join(peft::CONFIG_FILE), &files.config).expect("write");
            std::fs::write(out.join(peft::WEIGHTS_FILE), &files.weights).expect("write");
        }
        let (lp_a, _) = score(&m, &tokens, Some(&a.weights)).expect("score");
        let (lp_b, _) = score(&m, &tokens, Some(&back.weights)).expect("score");
        assert_eq!(lp_a, lp_b, "{name}: exported adapter scores differently");
        // The keys PEFT looks for are all there.
        let original = std::fs::read(fixtures().join(name).join(peft::WEIGHTS_FILE)).expect("file");
        let keys = |b: &[u8]| {
            let mut k: Vec<String> = safetensors::SafeTensors::deserialize(b)
                .expect("safetensors")
                .names()
                .into_iter()
                .cloned()
                .collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&files.weights),
            keys(&original),
            "{name}: tensor names"
        );
    }
}

/// The eval gate's drift measure: KL(adapter ‖ base) is zero for a zero delta, positive for a
/// real one, and grows with the delta's scale.
#[test]
fn kl_to_base_is_zero_without_a_delta_and_grows_with_it() {
    let m = load(false);
    let cfg = m.model.config().clone();
    let tokens = m
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog.", true)
        .expect("encode");
    let kl_at = |scale: f32| {
        let lora = random_lora(&cfg, 3, 4, &Proj::ALL, 0.05, scale);
        let a = AdapterWeights::new(&cfg, lora, None).expect("adapter");
        let kl = prefix_rft_engine::generate::kl_to_base(&m, &tokens, &a).expect("kl");
        assert_eq!(kl.len(), tokens.len());
        assert!(kl.iter().all(|x| x.is_finite() && *x >= 0.0), "{kl:?}");
        kl.iter().map(|&x| f64::from(x)).sum::<f64>() / kl.len() as f64
    };
    let zero = kl_at(0.0);
    let small = kl_at(4.0);
    let large = kl_at(16.0);
    assert!(zero < 1e-6, "{zero}");
    assert!(small > 1e-4, "{small}");
    assert!(large > 2.0 * small, "{small} {large}");
}
