//! The forward on tiny random models: both file formats agree, batching and the KV cache do
//! not change results, bad input is an error.

use std::sync::Arc;

use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::{
    AdapterHook, AdapterWeights, KvCache, Llama, LoadOptions, Logits, LogitsWanted, ModelConfig,
    ModelError, Proj, ProjRows, SeqStep,
};
use prefix_rft_engine::quant::GgmlDType;
use prefix_rft_engine::testing::{
    load_tiny_gguf, max_abs_diff, random_lora, tiny_weights, write_tiny_gguf, write_tiny_hf_dir,
    TinySpec,
};

fn tiny_gguf(spec: &TinySpec, dtype: GgmlDType) -> (tempfile::TempDir, Llama) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = load_tiny_gguf(dir.path(), spec, dtype);
    (dir, model)
}

fn all_logits(model: &Llama, tokens: &[u32]) -> Logits {
    let mut cache = KvCache::new(model.config());
    let mut step = [SeqStep {
        tokens,
        cache: &mut cache,
        adapter: None,
        logits: LogitsWanted::All,
    }];
    model.forward(&mut step).expect("forward")
}

#[test]
fn gguf_and_safetensors_give_the_same_logits() {
    for spec in [
        TinySpec::default(),
        TinySpec {
            tied: true,
            bias: true,
            ..TinySpec::default()
        },
    ] {
        let weights = tiny_weights(&spec, 7);
        let (_d, from_gguf) = tiny_gguf(&spec, GgmlDType::F32);
        let dir = tempfile::tempdir().expect("tempdir");
        write_tiny_hf_dir(dir.path(), &spec, &weights);
        let from_hf = Llama::from_hf_dir(dir.path(), LoadOptions::default()).expect("load hf");
        let tokens = [1u32, 5, 9, 33, 2, 70, 11, 4];
        let a = all_logits(&from_gguf, &tokens);
        let b = all_logits(&from_hf, &tokens);
        assert!(max_abs_diff(&a.data, &b.data) < 1e-4, "spec {spec:?}");
    }
}

#[test]
fn incremental_decode_equals_one_full_forward() {
    let spec = TinySpec::default();
    let (_d, model) = tiny_gguf(&spec, GgmlDType::F32);
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 96).collect();
    let full = all_logits(&model, &tokens);
    let mut cache = KvCache::new(model.config());
    // Prefill in two uneven chunks, then one token at a time.
    let chunks: Vec<&[u32]> = std::iter::once(&tokens[..5])
        .chain(std::iter::once(&tokens[5..12]))
        .chain(tokens[12..].chunks(1))
        .collect();
    let mut row = 0;
    for chunk in chunks {
        let mut step = [SeqStep {
            tokens: chunk,
            cache: &mut cache,
            adapter: None,
            logits: LogitsWanted::All,
        }];
        let out = model.forward(&mut step).expect("forward");
        for r in 0..chunk.len() {
            assert!(
                max_abs_diff(out.row(r), full.row(row)) < 1e-4,
                "position {row}"
            );
            row += 1;
        }
    }
    assert_eq!(cache.len(), tokens.len());
}

/// Runs each prompt alone for `steps` steps (prefill, then one token at a time), then all of
/// them as one batch, and asserts that every sequence's last-position logits agree.
#[allow(clippy::needless_range_loop)] // `i` indexes sequences across several parallel vectors
fn assert_batch_equals_alone(
    model: &Llama,
    prompts: &[Vec<u32>],
    hooks: &[Option<&dyn AdapterHook>],
    steps: usize,
    label: &str,
) -> Vec<Vec<Vec<f32>>> {
    let cfg = model.config();
    let next = |s: usize, p: &[u32]| vec![(s as u32 * 13 + p[0]) % 96];
    let mut alone = Vec::new();
    for (p, hook) in prompts.iter().zip(hooks) {
        let mut cache = KvCache::with_adapter(cfg, *hook);
        let mut rows = Vec::new();
        let mut input = p.clone();
        for s in 0..steps {
            let mut step = [SeqStep {
                tokens: &input,
                cache: &mut cache,
                adapter: *hook,
                logits: LogitsWanted::Last,
            }];
            let out = model.forward(&mut step).expect("forward");
            rows.push(out.last_of(0).expect("logits").to_vec());
            input = next(s, p);
        }
        alone.push(rows);
    }
    let mut caches: Vec<KvCache> = hooks
        .iter()
        .map(|h| KvCache::with_adapter(cfg, *h))
        .collect();
    let mut inputs = prompts.to_vec();
    for s in 0..steps {
        let mut batch: Vec<SeqStep<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .zip(hooks)
            .map(|((t, c), h)| SeqStep {
                tokens: t,
                cache: c,
                adapter: *h,
                logits: LogitsWanted::Last,
            })
            .collect();
        let out = model.forward(&mut batch).expect("forward");
        for i in 0..prompts.len() {
            let diff = max_abs_diff(out.last_of(i).expect("logits"), &alone[i][s]);
            assert!(diff < 1e-4, "{label} seq {i} step {s}: {diff}");
            inputs[i] = next(s, &prompts[i]);
        }
    }
    alone
}

#[test]
fn batched_decode_equals_one_by_one() {
    let spec = TinySpec::default();
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let (_d, model) = tiny_gguf(&spec, dtype);
        let prompts: Vec<Vec<u32>> = vec![vec![3, 4, 5], (10..27).collect(), vec![42]];
        assert_batch_equals_alone(&model, &prompts, &[None; 3], 6, &format!("{dtype:?}"));
    }
}

/// Wraps shared weights in a hook of its own, as a server lease does.
struct Leased(Arc<AdapterWeights>);

impl AdapterHook for Leased {
    fn add_delta(&self, rows: ProjRows<'_>) {
        self.0.add_delta(rows)
    }
    fn prefix_kv(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        self.0.prefix_kv(layer)
    }
    fn weights_key(&self) -> Option<usize> {
        self.0.weights_key()
    }
}

fn tiny_lora(cfg: &ModelConfig, seed: u64) -> AdapterWeights {
    AdapterWeights::new(cfg, random_lora(cfg, seed, 3, &Proj::ALL, 0.3, 1.5), None)
        .expect("tiny lora")
}

/// Rows of sequences that share an adapter's weights (the same hook twice, or two hooks over
/// the same weights) run as one group; interleaved with another adapter and the base, every
/// sequence still gets exactly the logits it gets alone, prefill (groups over 8 rows) and
/// decode alike.
#[test]
fn mixed_adapter_batch_equals_each_sequence_alone() {
    let spec = TinySpec::default();
    let (_d, model) = tiny_gguf(&spec, GgmlDType::Q8_0);
    let cfg = model.config().clone();
    let shared = Arc::new(tiny_lora(&cfg, 1));
    let other = tiny_lora(&cfg, 2);
    let leased = Leased(shared.clone());
    let hooks: Vec<Option<&dyn AdapterHook>> = vec![
        Some(&*shared),
        Some(&other),
        None,
        Some(&leased),
        Some(&*shared),
        Some(&leased),
    ];
    let prompts: Vec<Vec<u32>> = vec![
        (1..12).collect(),
        vec![3, 4, 5],
        (10..27).collect(),
        vec![42, 7],
        (30..40).collect(),
        vec![9],
    ];
    let alone = assert_batch_equals_alone(&model, &prompts, &hooks, 5, "mixed");
    // The adapters matter: the shared one moves the first sequence's logits off the base.
    let base = assert_batch_equals_alone(&model, &prompts[..1], &[None], 1, "base");
    assert!(max_abs_diff(&base[0][0], &alone[0][0]) > 1e-2);
}

#[test]
fn rejects_token_outside_vocabulary() {
    let (_d, model) = tiny_gguf(&TinySpec::default(), GgmlDType::F32);
    let mut cache = KvCache::new(model.config());
    let mut step = [SeqStep {
        tokens: &[1, 96],
        cache: &mut cache,
        adapter: None,
        logits: LogitsWanted::Last,
    }];
    assert!(matches!(
        model.forward(&mut step),
        Err(ModelError::TokenOutOfRange { token: 96, .. })
    ));
    assert_eq!(cache.len(), 0, "a refused step leaves the cache untouched");
}

#[test]
fn rejects_sequence_longer_than_context() {
    let (_d, model) = tiny_gguf(&TinySpec::default(), GgmlDType::F32);
    let tokens = vec![1u32; 257];
    let mut cache = KvCache::new(model.config());
    let mut step = [SeqStep {
        tokens: &tokens,
        cache: &mut cache,
        adapter: None,
        logits: LogitsWanted::Last,
    }];
    assert!(matches!(
        model.forward(&mut step),
        Err(ModelError::ContextLength {
            needed: 257,
            context: 256
        })
    ));
}

#[test]
fn refuses_truncated_model_file_naming_it() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &spec, &tiny_weights(&spec, 7), GgmlDType::Q8_0);
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = GgufFile::open(&path)
        .expect_err("truncated file must be refused")
        .to_string();
    assert!(err.contains("tiny.gguf"), "{err}");
}

#[test]
fn refuses_a_tokenizer_larger_than_the_model_vocabulary() {
    use prefix_rft_engine::gguf::GgufValue;
    use prefix_rft_engine::testing::tiny_gguf_writer;
    let spec = TinySpec::default();
    let mut w = tiny_gguf_writer(&spec, &tiny_weights(&spec, 7), GgmlDType::F32);
    // A byte-level vocabulary of 200 tokens for a model with 96 embedding rows.
    let mut tokens: Vec<GgufValue> = (0..199)
        .map(|i| GgufValue::String(format!("t{i}")))
        .collect();
    tokens.push(GgufValue::String("t1t2".into()));
    w.metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String("default".into()))
        .metadata("tokenizer.ggml.tokens", GgufValue::Array(tokens))
        .metadata(
            "tokenizer.ggml.merges",
            GgufValue::Array(vec![GgufValue::String("t1 t2".into())]),
        )
        .metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mismatch.gguf");
    w.write(&path).expect("write");
    let err = match prefix_rft_engine::LoadedModel::load(&path, LoadOptions::default()) {
        Ok(_) => panic!("a tokenizer larger than the vocabulary must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("mismatch.gguf") && err.contains("200") && err.contains("96"),
        "{err}"
    );
}
