//! Engine benchmark: prefill and decode throughput of one model file on this machine, printed
//! as one JSON object. `scripts/bench` runs it beside llama.cpp on the same file and threads.
//!
//! Usage: `engine-bench <model.gguf> [threads] [int8|f32]` (the last: what quantized weights
//! do with activations, `[model] activations`; int8 by default).

use std::time::Instant;

use prefix_rft_engine::bench::{
    median, peak_rss_mb, pseudo_token, DECODE_BATCHES, DECODE_STEPS, PREFILL_LENS, REPEATS,
};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::{KvCache, Llama, LoadOptions, LogitsWanted, SeqStep};
use prefix_rft_engine::quant::Activations;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: engine-bench <model.gguf> [threads] [int8|f32]")?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    let activations = match args.next().as_deref() {
        None | Some("int8") => Activations::Int8,
        Some("f32") => Activations::F32,
        Some(other) => return Err(format!("activations must be int8 or f32, not {other}").into()),
    };
    prefix_rft_engine::quant::set_num_threads(threads);
    let file = GgufFile::open(std::path::Path::new(&path))?;
    let opts = LoadOptions {
        activations,
        ..Default::default()
    };
    let model = Llama::from_gguf(&file, opts)?;
    let vocab = model.config().vocab_size as u32;
    // Deterministic pseudo-text: token ids spread over the vocabulary.
    let token = |i: usize| pseudo_token(i, vocab);

    let mut prefill = serde_json::Map::new();
    for &n in &PREFILL_LENS {
        let tokens: Vec<u32> = (0..n).map(token).collect();
        let mut runs = Vec::new();
        for _ in 0..REPEATS {
            let mut cache = KvCache::new(model.config());
            let t = Instant::now();
            let mut step = [SeqStep {
                tokens: &tokens,
                cache: &mut cache,
                adapter: None,
                logits: LogitsWanted::Last,
            }];
            model.forward(&mut step)?;
            runs.push(n as f64 / t.elapsed().as_secs_f64());
        }
        prefill.insert(n.to_string(), serde_json::json!(median(runs)));
    }

    let mut decode = serde_json::Map::new();
    for &b in &DECODE_BATCHES {
        let mut caches: Vec<KvCache> = (0..b).map(|_| KvCache::new(model.config())).collect();
        // A short distinct prompt per sequence, prefilled together.
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|s| (0..16).map(|i| token(i + 31 * s)).collect())
            .collect();
        {
            let mut steps: Vec<SeqStep<'_>> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, c)| SeqStep {
                    tokens: p,
                    cache: c,
                    adapter: None,
                    logits: LogitsWanted::Last,
                })
                .collect();
            model.forward(&mut steps)?;
        }
        let mut inputs: Vec<[u32; 1]> = (0..b).map(|s| [token(s + 7)]).collect();
        let t = Instant::now();
        for i in 0..DECODE_STEPS {
            let mut steps: Vec<SeqStep<'_>> = inputs
                .iter()
                .zip(caches.iter_mut())
                .map(|(x, c)| SeqStep {
                    tokens: x,
                    cache: c,
                    adapter: None,
                    logits: LogitsWanted::Last,
                })
                .collect();
            let logits = model.forward(&mut steps)?;
            for (s, input) in inputs.iter_mut().enumerate() {
                // Greedy continuation, as a real decode loop would.
                let row = logits.last_of(s).ok_or("missing logits")?;
                let best =
                    row.iter()
                        .enumerate()
                        .fold((0, f32::MIN), |a, (j, &v)| if v > a.1 { (j, v) } else { a });
                input[0] = if best.0 == 0 { token(i) } else { best.0 as u32 };
            }
        }
        decode.insert(
            b.to_string(),
            serde_json::json!((b * DECODE_STEPS) as f64 / t.elapsed().as_secs_f64()),
        );
    }

    let out = serde_json::json!({
        "engine": "prefix-rft",
        "model": path,
        "threads": threads,
        "activations": activations,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{out}");
    Ok(())
}
