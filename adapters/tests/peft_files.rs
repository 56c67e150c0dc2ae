//! PEFT files in and out on a tiny model: a round trip keeps every value, and each kind of
//! bad file is refused with a reason that names the problem.

use prefix_rft_adapters::peft::{self, Limits};
use prefix_rft_adapters::testing::{random_lora, random_prefix};
use prefix_rft_adapters::{AdapterError, AdapterKind, PeftFiles};
use prefix_rft_engine::model::adapter::proj_dims;
use prefix_rft_engine::model::{AdapterWeights, ModelConfig, Proj};
use prefix_rft_engine::testing::TinySpec;
use serde_json::{json, Value};

fn random_adapter(
    cfg: &ModelConfig,
    targets: &[Proj],
    rank: usize,
    prefix: Option<usize>,
) -> AdapterWeights {
    let pairs = random_lora(cfg, 5, rank, targets, 0.5, 2.0);
    let prefix = prefix.map(|n| random_prefix(cfg, 6, n, 1.0, 1.0));
    AdapterWeights::new(cfg, pairs, prefix).expect("valid adapter")
}

fn same(a: &AdapterWeights, b: &AdapterWeights) {
    let la: Vec<_> = a.lora().collect();
    let lb: Vec<_> = b.lora().collect();
    assert_eq!(la.len(), lb.len());
    for ((ka, wa), (kb, wb)) in la.iter().zip(&lb) {
        assert_eq!(ka, kb);
        assert_eq!(wa, wb);
    }
    assert_eq!(a.prefix(), b.prefix());
}

fn parse(files: &PeftFiles, cfg: &ModelConfig) -> Result<peft::PeftAdapter, AdapterError> {
    peft::parse(&files.config, &files.weights, cfg, &Limits::default())
}

fn config_json(files: &PeftFiles) -> Value {
    serde_json::from_slice(&files.config).expect("config json")
}

fn with_config(files: &PeftFiles, edit: impl FnOnce(&mut Value)) -> PeftFiles {
    let mut c = config_json(files);
    edit(&mut c);
    PeftFiles {
        config: serde_json::to_vec(&c).expect("json"),
        weights: files.weights.clone(),
    }
}

fn invalid_reason(r: Result<peft::PeftAdapter, AdapterError>) -> String {
    match r {
        Err(AdapterError::Invalid(m)) | Err(AdapterError::TooLarge(m)) => m,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got a valid adapter"),
    }
}

#[test]
fn lora_prefix_and_both_round_trip() {
    let cfg = TinySpec::default().config();
    for (targets, prefix, kind) in [
        (&[Proj::Q, Proj::V][..], None, AdapterKind::Lora),
        (&Proj::ALL[..], None, AdapterKind::Lora),
        (&[][..], Some(3), AdapterKind::Prefix),
        (&[Proj::Down][..], Some(2), AdapterKind::LoraPrefix),
    ] {
        let w = random_adapter(&cfg, targets, 3, prefix);
        let files = peft::to_files(&w, &cfg, "tiny").expect("export");
        let back = parse(&files, &cfg).expect("import");
        assert_eq!(back.kind(), kind);
        same(&w, &back.weights);
        let c = config_json(&files);
        let peft_type = if targets.is_empty() {
            "PREFIX_TUNING"
        } else {
            "LORA"
        };
        assert_eq!(c["peft_type"], peft_type);
        assert_eq!(c["base_model_name_or_path"], "tiny");
    }
}

#[test]
fn lora_scale_follows_alpha_and_rslora() {
    let cfg = TinySpec::default().config();
    let files = peft::to_files(&random_adapter(&cfg, &[Proj::Q], 4, None), &cfg, "t").unwrap();
    let scale = |f: &PeftFiles| {
        let a = parse(f, &cfg).expect("valid");
        let scale = a.weights.lora().next().expect("a pair").1.scale;
        scale
    };
    assert_eq!(scale(&files), 2.0, "lora_alpha = scale · r is written");
    let alpha16 = with_config(&files, |c| c["lora_alpha"] = json!(16));
    assert_eq!(scale(&alpha16), 4.0);
    let rs = with_config(&files, |c| {
        c["lora_alpha"] = json!(16);
        c["use_rslora"] = json!(true);
    });
    assert_eq!(scale(&rs), 8.0, "rsLoRA divides by √r");
    // Finite in f64 but not as the forward's f32 scale (found by schemathesis through
    // POST /v1/adapters, where it was a 500): refused with the reason.
    let huge = with_config(&files, |c| c["lora_alpha"] = json!(7.6e267));
    let err = parse(&huge, &cfg)
        .expect_err("a scale beyond f32")
        .to_string();
    assert!(err.contains("beyond f32"), "{err}");
}

#[test]
fn regex_target_modules_take_the_modules_from_the_weights() {
    let cfg = TinySpec::default().config();
    let files = peft::to_files(
        &random_adapter(&cfg, &[Proj::K, Proj::Up], 2, None),
        &cfg,
        "t",
    )
    .unwrap();
    let regex = with_config(&files, |c| {
        c["target_modules"] = json!(".*(k_proj|up_proj)")
    });
    let a = parse(&regex, &cfg).expect("a regex string is accepted");
    assert_eq!(a.lora.expect("lora").targets, vec![Proj::K, Proj::Up]);
}

#[test]
fn bad_configs_are_refused_with_a_reason() {
    let cfg = TinySpec::default().config();
    let files = peft::to_files(
        &random_adapter(&cfg, &[Proj::Q, Proj::V], 4, None),
        &cfg,
        "t",
    )
    .unwrap();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "unknown target module",
            Box::new(|c| c["target_modules"] = json!(["q_proj", "lm_head"])),
        ),
        (
            "no LoRA pair for it",
            Box::new(|c| c["target_modules"] = json!(["q_proj", "v_proj", "o_proj"])),
        ),
        (
            "does not list",
            Box::new(|c| c["target_modules"] = json!(["q_proj"])),
        ),
        ("do not fit r=5", Box::new(|c| c["r"] = json!(5))),
        ("outside 1..=128", Box::new(|c| c["r"] = json!(4096))),
        ("DoRA", Box::new(|c| c["use_dora"] = json!(true))),
        ("bias", Box::new(|c| c["bias"] = json!("all"))),
        (
            "modules_to_save",
            Box::new(|c| c["modules_to_save"] = json!(["lm_head"])),
        ),
        (
            "rank_pattern",
            Box::new(|c| c["rank_pattern"] = json!({"q_proj": 8})),
        ),
        ("not supported", Box::new(|c| c["peft_type"] = json!("IA3"))),
        (
            "missing field",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("peft_type");
            }),
        ),
        ("declares no prefix", Box::new(|_| {})),
    ];
    for (want, edit) in cases {
        let mut bad = with_config(&files, |c| edit(c));
        if want == "declares no prefix" {
            // A LoRA file with a stray prompt_embeddings tensor.
            let both = peft::to_files(
                &random_adapter(&cfg, &[Proj::Q, Proj::V], 4, Some(2)),
                &cfg,
                "t",
            )
            .unwrap();
            bad = with_config(&both, |c| {
                c.as_object_mut().unwrap().remove("prefix_rft");
            });
        }
        let reason = invalid_reason(parse(&bad, &cfg));
        assert!(reason.contains(want), "expected {want:?} in {reason:?}");
    }
}

#[test]
fn shapes_that_do_not_fit_the_base_are_refused() {
    let cfg = TinySpec::default().config();
    let bigger = TinySpec {
        hidden: 128,
        intermediate: 256,
        ..TinySpec::default()
    }
    .config();
    let files =
        peft::to_files(&random_adapter(&bigger, &[Proj::Q], 2, None), &bigger, "t").unwrap();
    let reason = invalid_reason(parse(&files, &cfg));
    assert!(reason.contains("do not fit"), "{reason}");
    let deeper = TinySpec {
        layers: 3,
        ..TinySpec::default()
    }
    .config();
    let files =
        peft::to_files(&random_adapter(&deeper, &[Proj::O], 2, None), &deeper, "t").unwrap();
    let reason = invalid_reason(parse(&files, &cfg));
    assert!(reason.contains("has 2 layers"), "{reason}");
    let prefix = peft::to_files(&random_adapter(&deeper, &[], 2, Some(2)), &deeper, "t").unwrap();
    let reason = invalid_reason(parse(&prefix, &cfg));
    assert!(reason.contains("num_layers 3"), "{reason}");
}

fn tensor_file(tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("view"),
            )
        })
        .collect();
    safetensors::serialize(views, &None).expect("serialize")
}

#[test]
fn hostile_weight_files_are_refused() {
    let cfg = TinySpec::default().config();
    let files = peft::to_files(&random_adapter(&cfg, &[Proj::Q], 2, None), &cfg, "t").unwrap();
    // Truncated file.
    let truncated = PeftFiles {
        config: files.config.clone(),
        weights: files.weights[..files.weights.len() / 2].to_vec(),
    };
    assert!(invalid_reason(parse(&truncated, &cfg)).contains("adapter_model.safetensors"));
    // A header declaring a 10 GB tensor over a tiny buffer.
    let header = br#"{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[50000,50000],"data_offsets":[0,10000000000]}}"#;
    let mut huge = (header.len() as u64).to_le_bytes().to_vec();
    huge.extend_from_slice(header);
    huge.extend_from_slice(&[0u8; 64]);
    let reason = invalid_reason(parse(
        &PeftFiles {
            config: files.config.clone(),
            weights: huge,
        },
        &cfg,
    ));
    assert!(reason.contains("safetensors"), "{reason}");
    // Garbage.
    let garbage = PeftFiles {
        config: files.config.clone(),
        weights: vec![0xff; 100],
    };
    invalid_reason(parse(&garbage, &cfg));
    // NaN in lora_B.
    let (i, o) = proj_dims(&cfg, Proj::Q);
    let a: Vec<u8> = vec![0.1f32; 2 * i]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let mut bvals = vec![0.1f32; o * 2];
    bvals[7] = f32::NAN;
    let b: Vec<u8> = bvals.iter().flat_map(|x| x.to_le_bytes()).collect();
    let stem = "base_model.model.model.layers.0.self_attn.q_proj";
    let nan = tensor_file(&[
        (
            &format!("{stem}.lora_A.weight"),
            safetensors::Dtype::F32,
            vec![2, i],
            a.clone(),
        ),
        (
            &format!("{stem}.lora_B.weight"),
            safetensors::Dtype::F32,
            vec![o, 2],
            b,
        ),
    ]);
    let reason = invalid_reason(parse(
        &PeftFiles {
            config: files.config.clone(),
            weights: nan,
        },
        &cfg,
    ));
    assert!(reason.contains("not finite"), "{reason}");
    // An unexpected tensor name.
    let odd = tensor_file(&[(
        "base_model.model.lm_head.lora_A.weight",
        safetensors::Dtype::F32,
        vec![2, i],
        a,
    )]);
    let reason = invalid_reason(parse(
        &PeftFiles {
            config: files.config.clone(),
            weights: odd,
        },
        &cfg,
    ));
    assert!(reason.contains("unexpected tensor"), "{reason}");
    // Over the byte limit.
    let small = Limits {
        max_file_bytes: 100,
        ..Limits::default()
    };
    assert!(matches!(
        peft::parse(&files.config, &files.weights, &cfg, &small),
        Err(AdapterError::TooLarge(_))
    ));
}

#[test]
fn half_precision_weights_are_read() {
    let cfg = TinySpec::default().config();
    let (i, o) = proj_dims(&cfg, Proj::V);
    let half = |n: usize, v: f32| -> Vec<u8> {
        (0..n)
            .flat_map(|_| half::f16::from_f32(v).to_le_bytes())
            .collect()
    };
    let stem = "base_model.model.model.layers.1.self_attn.v_proj";
    let weights = tensor_file(&[
        (
            &format!("{stem}.lora_A.weight"),
            safetensors::Dtype::F16,
            vec![1, i],
            half(i, 0.5),
        ),
        (
            &format!("{stem}.lora_B.weight"),
            safetensors::Dtype::F16,
            vec![o, 1],
            half(o, 0.25),
        ),
    ]);
    let config = serde_json::to_vec(&json!({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["v_proj"]
    }))
    .unwrap();
    let a = parse(&PeftFiles { config, weights }, &cfg).expect("f16 adapter");
    let (key, w) = a.weights.lora().next().expect("one pair");
    assert_eq!(*key, (1, Proj::V));
    assert!(w.a.iter().all(|&x| x == 0.5) && w.b.iter().all(|&x| x == 0.25));
}
