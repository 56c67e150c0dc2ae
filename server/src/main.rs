//! `prefix-rft`: parses arguments and runs a subcommand; the work lives in the libraries.

mod cli_adapters;
mod cli_train;

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
use prefix_rft_server::config::{Config, ModelBackend};
use prefix_rft_server::feedback::cli::FeedbackCommand;
use prefix_rft_server::feedback::sqlite::{SqliteFeedbackStore, StoreOptions};
use prefix_rft_server::AppState;

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
    /// Serves the OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Works with the adapter store offline: list, import, export.
    Adapters(cli_adapters::AdaptersArgs),
    /// Exports or imports training data of the feedback database.
    #[command(subcommand)]
    Feedback(FeedbackCommand),
    /// Trains an adapter offline on TRL-format JSON Lines and writes PEFT files.
    Train(cli_train::TrainArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (default: the embedded config.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bind address (overrides `[server] host`).
    #[arg(long)]
    host: Option<String>,
    /// Bind port (overrides `[server] port`; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Data directory (overrides `[server] data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Start training jobs automatically from feedback (overrides `[training] auto`).
    #[arg(long)]
    auto_training: Option<bool>,
    /// What generates tokens: `engine` or `mistralrs` (overrides `[model] backend`; mistralrs
    /// needs a build with `--features mistralrs`).
    #[arg(long, value_enum)]
    backend: Option<ModelBackend>,
    /// Shut down (with the usual drain) when standard input closes, so a supervising process
    /// that dies takes the server with it.
    #[arg(long, hide = true)]
    exit_with_stdin: bool,
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
        Command::Serve(args) => run_serve(args),
        Command::Adapters(args) => cli_adapters::run(args),
        Command::Feedback(cmd) => Ok(prefix_rft_server::feedback::cli::run(cmd)?),
        Command::Train(args) => cli_train::run(args),
    }
}

/// The model `[model] path` names by default, which `scripts/fetch-model` provides.
const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Finds `scripts/fetch-model` next to the current directory or above the binary
/// (`target/<profile>/prefix-rft` lives two levels under the repository root).
fn find_fetch_script() -> Option<PathBuf> {
    let mut roots = vec![std::env::current_dir().ok()?];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(PathBuf::from));
    }
    roots
        .into_iter()
        .map(|r| r.join("scripts/fetch-model"))
        .find(|p| p.is_file())
}

/// Fetches the default model when it is configured and missing.
fn ensure_model(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if path != std::path::Path::new(DEFAULT_MODEL_PATH) {
        bail!("model {} does not exist", path.display());
    }
    let Some(script) = find_fetch_script() else {
        bail!(
            "model {} is missing and scripts/fetch-model was not found; run it from the repository",
            path.display()
        );
    };
    eprintln!(
        "{} is missing; fetching it with {}",
        path.display(),
        script.display()
    );
    let dir = path.parent().map(PathBuf::from).unwrap_or_default();
    let dir = std::env::current_dir()?.join(dir);
    let status = std::process::Command::new(&script)
        .env("PREFIX_RFT_MODELS_DIR", &dir)
        .status()?;
    if !status.success() || !path.exists() {
        bail!("scripts/fetch-model failed ({status}); see its output above");
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    // Only training uses rayon (through candle): its threads run at the lowest priority so a
    // training job does not slow serving down.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("train-{i}"))
        .start_handler(|_| prefix_rft_engine::quant::lower_thread_priority())
        .build_global();
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(h) = args.host {
        config.server.host = h;
    }
    if let Some(p) = args.port {
        config.server.port = p;
    }
    if let Some(auto) = args.auto_training {
        config.training.auto = auto;
    }
    if let Some(b) = args.backend {
        config.model.backend = b;
    }
    if let Some(d) = args.data_dir {
        config.server.data_dir = d;
    }
    let model_path = config.model.path.clone();
    ensure_model(&model_path)?;
    std::fs::create_dir_all(&config.server.data_dir)
        .with_context(|| format!("creating data dir {}", config.server.data_dir.display()))?;
    // Before listening: a database that cannot be opened stops the start, visibly.
    let feedback = SqliteFeedbackStore::open(StoreOptions {
        path: config.feedback_path(),
        retention: (config.feedback.retention_days > 0)
            .then(|| std::time::Duration::from_secs(config.feedback.retention_days * 86_400)),
    })
    .with_context(|| format!("opening {}", config.feedback_path().display()))?;
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        println!("listening on http://{local}");
        let _ = std::io::stdout().flush();
        let state = AppState::with_feedback(config, std::sync::Arc::new(feedback))?;
        let load_state = std::sync::Arc::clone(&state);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = prefix_rft_server::load_backend(&load_state, &model_path) {
                tracing::error!(error = %e, "loading the model failed");
                eprintln!("error: loading {}: {e}", model_path.display());
                load_state.set_failed();
            }
        });
        let exit_with_stdin = args.exit_with_stdin;
        prefix_rft_server::run(listener, state, shutdown_signal(exit_with_stdin)).await?;
        eprintln!("shut down");
        anyhow::Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT (or, when asked, when stdin closes).
async fn shutdown_signal(exit_with_stdin: bool) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    let stdin_closed = async {
        if !exit_with_stdin {
            return std::future::pending::<()>().await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut sink = [0u8; 256];
            let mut stdin = std::io::stdin();
            while let Ok(n) = std::io::Read::read(&mut stdin, &mut sink) {
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(());
        });
        let _ = rx.await;
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = stdin_closed => {},
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
        activations: config.model.activations,
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
