//! Load generator for `scripts/bench-server`: C concurrent clients send streaming chat
//! completions to an OpenAI-compatible server on loopback and it reports output throughput and
//! time to first token as one JSON object. Bounded by a request count and a wall-clock limit.
//!
//! Usage: `loadgen <base-url> <api-key> <model> <concurrency> <requests> <max-tokens> [seconds]`

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

/// Prompts cycled over the requests, so requests differ as real traffic does.
const PROMPTS: [&str; 8] = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List ten uses for a paperclip and explain each one.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main differences between cats and dogs as pets?",
    "Write a poem about autumn leaves.",
    "Give step-by-step instructions for making tea.",
    "Summarise the history of the printing press.",
];

struct Sample {
    ttft: Duration,
    tokens: u64,
    ok: bool,
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    model: &str,
    i: usize,
    max_tokens: u64,
) -> Sample {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let failed = Sample {
        ttft: Duration::ZERO,
        tokens: 0,
        ok: false,
    };
    let Ok(resp) = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
    else {
        return failed;
    };
    if !resp.status().is_success() {
        return failed;
    }
    let mut stream = resp.bytes_stream();
    let (mut ttft, mut chunks, mut usage) = (None, 0u64, None);
    let mut buf = String::new();
    while let Some(Ok(bytes)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n);
            }
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            if !content.is_empty() {
                ttft.get_or_insert_with(|| start.elapsed());
                chunks += 1;
            }
        }
    }
    Sample {
        ttft: ttft.unwrap_or_else(|| start.elapsed()),
        tokens: usage.unwrap_or(chunks),
        ok: true,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 6 {
        return Err("usage: loadgen <base-url> <api-key> <model> <concurrency> <requests> <max-tokens> [seconds]".into());
    }
    let (url, key, model) = (args[0].clone(), args[1].clone(), args[2].clone());
    let concurrency: usize = args[3].parse()?;
    let requests: usize = args[4].parse()?;
    let max_tokens: u64 = args[5].parse()?;
    let limit = Duration::from_secs(args.get(6).map(|s| s.parse()).transpose()?.unwrap_or(300));
    let client = reqwest::Client::builder().timeout(limit).build()?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, key, model, next) = (
            client.clone(),
            url.clone(),
            key.clone(),
            model.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests || start.elapsed() > limit {
                    break;
                }
                samples.push(one(&client, &url, &key, &model, i, max_tokens).await);
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await?);
    }
    let wall = start.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut ttfts: Vec<f64> = ok.iter().map(|s| s.ttft.as_secs_f64()).collect();
    ttfts.sort_by(f64::total_cmp);
    let tokens: u64 = ok.iter().map(|s| s.tokens).sum();
    println!(
        "{}",
        json!({
            "concurrency": concurrency,
            "requests": samples.len(),
            "errors": samples.len() - ok.len(),
            "output_tokens": tokens,
            "wall_s": wall,
            "throughput_tok_s": tokens as f64 / wall,
            "ttft_p50_s": percentile(&ttfts, 0.5),
            "ttft_p99_s": percentile(&ttfts, 0.99),
        })
    );
    Ok(())
}
