//! mistralrs on one GGUF, measured the way `engine-bench` measures our engine: prefill tokens/s
//! at 128 and 512 prompt tokens, aggregate decode tokens/s at 1, 4 and 16 concurrent
//! sequences, peak RSS; printed as one JSON object with the same keys. `scripts/bench` runs it
//! beside our engine and llama.cpp (same file, same threads) when mistralrs is built in.
//!
//! Usage: `mistralrs-bench <model.gguf> [threads]` (built with `--features mistralrs`).
//!
//! Prefill is one request per length with `max_len = 1`, timed by mistralrs's own usage
//! figures. Decode runs `b` requests at once twice, for 1 and for 1 + 64 new tokens, with the
//! end-of-sequence tokens biased away so each sequence makes all 64; the 64 tokens per
//! sequence are timed as the difference, so the prefill of the short prompts cancels out.

use std::collections::HashMap;
use std::time::Instant;

use mistralrs::core::{RequestMessage, TokenSource};
use mistralrs::{GgufModelBuilder, Model, Request, Response, SamplingParams};
use prefix_rft_engine::bench::{
    median, peak_rss_mb, pseudo_token, DECODE_BATCHES, DECODE_STEPS, PREFILL_LENS, REPEATS,
};
use prefix_rft_server::backend::mistralrs::plain_request;

/// Sends `prompt` for `new_tokens` greedy tokens (EOS banned) and waits for the answer.
async fn complete(
    model: &Model,
    prompt: Vec<u32>,
    new_tokens: usize,
    banned: &HashMap<u32, f32>,
) -> anyhow::Result<mistralrs::CompletionResponse> {
    let inner = model.inner();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let mut sampling = SamplingParams::deterministic();
    sampling.max_len = Some(new_tokens);
    sampling.logits_bias = Some(banned.clone());
    let request = plain_request(
        inner.next_request_id(),
        RequestMessage::CompletionTokens(prompt),
        sampling,
        tx,
        None,
    );
    inner
        .get_sender(None)?
        .send(Request::Normal(Box::new(request)))
        .await?;
    match rx.recv().await {
        Some(Response::CompletionDone(r)) => Ok(r),
        Some(Response::CompletionModelError(e, _)) => anyhow::bail!("model error: {e}"),
        Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
            anyhow::bail!("{e}")
        }
        _ => anyhow::bail!("unexpected response"),
    }
}

/// Seconds to run `prompts` at once for `new_tokens` each.
async fn batch_secs(
    model: &Model,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    banned: &HashMap<u32, f32>,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let runs = prompts
        .iter()
        .map(|p| complete(model, p.clone(), new_tokens, banned));
    for r in futures_util::future::join_all(runs).await {
        let r = r?;
        let made = r.usage.completion_tokens;
        anyhow::ensure!(made == new_tokens, "made {made} tokens, not {new_tokens}");
    }
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: mistralrs-bench <model.gguf> [threads]"))?;
    let threads: usize = args.next().map(|t| t.parse()).transpose()?.unwrap_or(2);
    // candle's CPU kernels size their pools from this (read once, before any runs).
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(run(path, threads))
}

async fn run(path: String, threads: usize) -> anyhow::Result<()> {
    let file = std::path::Path::new(&path);
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = file
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| anyhow::anyhow!("{path} is not a file name"))?;
    let model = GgufModelBuilder::new(dir.to_string_lossy(), vec![name])
        .with_force_cpu()
        .with_token_source(TokenSource::None)
        .with_max_num_seqs(16)
        .with_prefix_cache_n(None)
        .build()
        .await?;
    // The same deterministic pseudo-text as engine-bench.
    let vocab = 49152;
    let token = |i: usize| pseudo_token(i, vocab);
    // SmolLM2's end-of-sequence tokens (<|endoftext|>, <|im_end|>) never end a bench run.
    let banned: HashMap<u32, f32> = [(0u32, -1e9f32), (2, -1e9)].into_iter().collect();

    let mut prefill = serde_json::Map::new();
    for &n in &PREFILL_LENS {
        let tokens: Vec<u32> = (0..n).map(token).collect();
        let mut runs = Vec::new();
        for _ in 0..REPEATS {
            let t = Instant::now();
            complete(&model, tokens.clone(), 1, &banned).await?;
            runs.push(n as f64 / t.elapsed().as_secs_f64());
        }
        prefill.insert(n.to_string(), serde_json::json!(median(runs)));
    }

    let mut decode = serde_json::Map::new();
    for &b in &DECODE_BATCHES {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|s| (0..16).map(|i| token(i + 31 * s)).collect())
            .collect();
        let short = batch_secs(&model, &prompts, 1, &banned).await?;
        let long = batch_secs(&model, &prompts, 1 + DECODE_STEPS, &banned).await?;
        decode.insert(
            b.to_string(),
            serde_json::json!((b * DECODE_STEPS) as f64 / (long - short).max(1e-9)),
        );
    }

    let out = serde_json::json!({
        "engine": "mistralrs 0.8.1",
        "model": path,
        "threads": threads,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{out}");
    Ok(())
}
