//! `prefix-rft`: parses arguments and runs a subcommand; the work lives in the libraries.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use prefix_rft_engine::chat_template::ChatMessage;
use prefix_rft_engine::generate::{generate, GenerationConfig};
use prefix_rft_engine::model::LoadOptions;
use prefix_rft_engine::sampler::SamplingParams;
use prefix_rft_engine::LoadedModel;
use prefix_rft_server::config::Config;

#[derive(Parser)]
#[command(
    name = "prefix-rft",
    version,
    about = "OpenAI-compatible LLM server with per-tenant Prefix-RFT adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generates text from a prompt with the engine and streams it to the terminal.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model: a GGUF file or a Hugging Face directory (default: `[model] path` of the config).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Configuration file (default: the embedded config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as raw text instead of a user message in the chat template.
    #[arg(long)]
    raw: bool,
    /// Optional system message (chat mode).
    #[arg(long)]
    system: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Top-k filter (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute threads (0 = one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Dequantise weights to f32 at load.
    #[arg(long)]
    dequantize: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Generate(args) => run_generate(args),
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let path = args.model.unwrap_or(config.model.path.clone());
    let threads = args.threads.unwrap_or(config.model.threads);
    if threads > 0 {
        prefix_rft_engine::quant::set_num_threads(threads);
    }
    if !path.exists() {
        bail!(
            "{} does not exist (for the default model run scripts/fetch-model)",
            path.display()
        );
    }
    let opts = LoadOptions {
        dequantize: args.dequantize || config.model.dequantize,
    };
    let t0 = Instant::now();
    let m =
        LoadedModel::load(&path, opts).with_context(|| format!("loading {}", path.display()))?;
    eprintln!(
        "loaded {} in {:.2}s",
        path.display(),
        t0.elapsed().as_secs_f64()
    );

    let text = match (&m.chat_template, args.raw) {
        (Some(t), false) => {
            let mut messages = Vec::new();
            if let Some(s) = args.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: s,
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: args.prompt,
            });
            t.render(&messages, true)?
        }
        _ => args.prompt,
    };
    let prompt = m.tokenizer.encode(&text, true)?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    let cfg = GenerationConfig {
        max_tokens: args.max_tokens,
        sampling,
        stop: args.stop,
        ignore_eos: false,
    };
    let mut stdout = std::io::stdout().lock();
    let t1 = Instant::now();
    let out = generate(&m, &prompt, &cfg, None, &mut |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    let secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "\n[{} prompt tokens, {} new tokens in {:.2}s: {:.1} tok/s, finish: {:?}]",
        prompt.len(),
        out.tokens.len(),
        secs,
        out.tokens.len() as f64 / secs,
        out.finish_reason
    );
    Ok(())
}
