//! Feedback write benchmark for `scripts/bench-feedback`: creates a few completions with many
//! choices, then, at each concurrency level, C clients post feedback on them as fast as the
//! server acknowledges it (ratings alternate, so after the first round every write is an
//! update, still one committed transaction each). Reports acknowledged writes per second and
//! latency percentiles as one JSON object per level on standard output.
//!
//! Usage: `feedback-bench <base-url> <api-key> <model> <levels, e.g. 1,16,64> <seconds per level>`

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Completions created as feedback targets.
const COMPLETIONS: usize = 8;
/// Choices per completion (the server's `max_n` must allow it).
const CHOICES: u64 = 64;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn make_targets(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    model: &str,
) -> Result<Vec<(String, u64)>, Box<dyn std::error::Error>> {
    let mut targets = Vec::new();
    for i in 0..COMPLETIONS {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": format!("Say the number {i}.")}],
            "max_tokens": 1,
            "n": CHOICES,
        });
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        let id = v["id"]
            .as_str()
            .ok_or_else(|| format!("completion failed ({status}): {v}"))?;
        targets.extend((0..CHOICES).map(|c| (id.to_string(), c)));
    }
    Ok(targets)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err("usage: feedback-bench <base-url> <api-key> <model> <levels> <seconds>".into());
    }
    let (url, key, model) = (args[0].clone(), args[1].clone(), args[2].clone());
    let levels: Vec<usize> = args[3]
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let secs = Duration::from_secs_f64(args[4].parse()?);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(60))
        .build()?;
    let targets = std::sync::Arc::new(make_targets(&client, &url, &key, &model).await?);
    for concurrency in levels {
        let start = Instant::now();
        let mut workers = Vec::new();
        for w in 0..concurrency {
            let (client, url, key, targets) =
                (client.clone(), url.clone(), key.clone(), targets.clone());
            workers.push(tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                let mut i = w;
                while start.elapsed() < secs {
                    let (id, choice) = &targets[i % targets.len()];
                    let rating = if (i / targets.len()) % 2 == 0 {
                        "up"
                    } else {
                        "down"
                    };
                    i += concurrency;
                    let body =
                        json!({"completion_id": id, "choice_index": choice, "rating": rating});
                    let t0 = Instant::now();
                    let ok = match client
                        .post(format!("{url}/v1/feedback"))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        lat.push(t0.elapsed().as_secs_f64());
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            }));
        }
        let (mut lat, mut errors) = (Vec::new(), 0);
        for w in workers {
            let (l, e) = w.await?;
            lat.extend(l);
            errors += e;
        }
        let wall = start.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        println!(
            "{}",
            json!({
                "concurrency": concurrency,
                "acknowledged_writes": lat.len(),
                "errors": errors,
                "wall_s": wall,
                "writes_per_s": lat.len() as f64 / wall,
                "latency_p50_ms": percentile(&lat, 0.5) * 1e3,
                "latency_p99_ms": percentile(&lat, 0.99) * 1e3,
                "latency_max_ms": lat.last().copied().unwrap_or(f64::NAN) * 1e3,
            })
        );
    }
    Ok(())
}
