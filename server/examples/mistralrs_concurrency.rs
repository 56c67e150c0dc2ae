//! Shows why the mistralrs backend hands mistralrs one sequence at a time: eight greedy
//! completion requests ("Write one sentence about the number {i}.") sent to mistralrs 0.8.1
//! together, on the CPU, and the same eight one after another.
//!
//! ```sh
//! cargo run -p prefix-rft-server --features mistralrs --example mistralrs_concurrency
//! ```
//!
//! Measured here (SmolLM2-135M-Instruct Q4_1): one after another, answer `i` is about the
//! number `i`; together, every answer is about the number 7, the last prompt sent, with
//! `max_num_seqs` 32 or 1 and with prompts of different lengths. The run exits non-zero while
//! that is so, so a newer mistralrs can be checked with one command.

use mistralrs::core::{RequestMessage, TokenSource};
use mistralrs::{CompletionResponse, GgufModelBuilder, Model, Request, Response, SamplingParams};
use prefix_rft_server::backend::mistralrs::plain_request;

const MODEL_DIR: &str = "models";
const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Sends a greedy completion of `prompt` (12 tokens) and returns the receiver of its answer.
async fn send(
    model: &Model,
    prompt: String,
) -> anyhow::Result<tokio::sync::mpsc::Receiver<Response>> {
    let inner = model.inner();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut sampling = SamplingParams::deterministic();
    sampling.max_len = Some(12);
    let request = plain_request(
        inner.next_request_id(),
        RequestMessage::Completion {
            text: prompt,
            echo_prompt: false,
            best_of: None,
        },
        sampling,
        tx,
        None,
    );
    inner
        .get_sender(None)?
        .send(Request::Normal(Box::new(request)))
        .await?;
    Ok(rx)
}

async fn answer(mut rx: tokio::sync::mpsc::Receiver<Response>) -> anyhow::Result<String> {
    match rx.recv().await {
        Some(Response::CompletionDone(CompletionResponse { choices, .. })) => {
            Ok(choices.first().map(|c| c.text.clone()).unwrap_or_default())
        }
        _ => anyhow::bail!("mistralrs failed the request"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let model = GgufModelBuilder::new(MODEL_DIR, vec![MODEL_FILE])
        .with_force_cpu()
        .with_token_source(TokenSource::None)
        .with_prefix_cache_n(None)
        .build()
        .await?;
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Write one sentence about the number {i}."))
        .collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(answer(send(&model, p.clone()).await?).await?);
    }
    let mut pending = Vec::new();
    for p in &prompts {
        pending.push(send(&model, p.clone()).await?);
    }
    let mut together = Vec::new();
    for rx in pending {
        together.push(answer(rx).await?);
    }
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        println!("{i}: alone {a:?}\n   together {t:?}");
    }
    let differ = alone.iter().zip(&together).filter(|(a, t)| a != t).count();
    println!(
        "{differ} of {} answers differ when sent together",
        prompts.len()
    );
    anyhow::ensure!(differ == 0, "concurrent sequences are mixed up");
    Ok(())
}
