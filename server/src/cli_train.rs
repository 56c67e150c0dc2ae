//! `prefix-rft train`: the trainer plugin's code run offline on TRL-format JSON Lines, writing
//! a PEFT adapter directory, with a progress bar and a summary table.
//!
//! Rows (one JSON object a line, as TRL's datasets):
//! - preference: `prompt`, `chosen`, `rejected`, each a string or a list of chat messages
//!   (`[{"role", "content"}]`); message lists go through the model's chat template;
//! - unpaired (KTO): `prompt`, `completion`, `label` (true = thumbs up);
//! - SFT: `messages` (the last one is the assistant's answer) or `prompt` + `completion`.
//!
//! Plain-string completions get the end-of-sequence token appended, as TRL does; templated
//! ones end with whatever the template closes an assistant turn with.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use prefix_rft_adapters::AdapterKind;
use prefix_rft_engine::chat_template::ChatMessage;
use prefix_rft_engine::model::LoadOptions;
use prefix_rft_engine::train::{TrainModel, TrainOptions};
use prefix_rft_engine::LoadedModel;
use prefix_rft_trainer::job::{
    self, CompletionIds, Job, JobConfig, JobData, LoraSpec, PairIds, PrefixSpec,
};
use prefix_rft_trainer::train::TrainParams;
use serde_json::Value;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Base model GGUF file.
    #[arg(long)]
    base: PathBuf,
    /// TRL-format JSON Lines (preference, unpaired or SFT rows).
    #[arg(long)]
    data: PathBuf,
    /// Output directory for adapter_config.json and adapter_model.safetensors.
    #[arg(long)]
    out: PathBuf,
    /// Existing PEFT adapter directory to continue from (also the DPO reference).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Adapter kind of a new adapter: lora, prefix or lora+prefix.
    #[arg(long, default_value = "lora")]
    kind: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (default 2 × rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// LoRA target modules, comma-separated (default: all seven projections).
    #[arg(long, value_delimiter = ',')]
    target_modules: Option<Vec<String>>,
    /// Prefix virtual tokens (prefix kinds).
    #[arg(long, default_value_t = 16)]
    num_virtual_tokens: usize,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Optimiser steps (overrides --epochs).
    #[arg(long)]
    steps: Option<usize>,
    /// Examples per step.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// DPO/KTO β.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// SFT weight α.
    #[arg(long, default_value_t = 1.0)]
    sft_weight: f64,
    /// Warm-up share of the steps.
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    /// Gradient-norm bound (0 = off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Seed (shuffling and initialisation).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of preference rows held out for the before/after eval (by a hash of the row);
    /// 0 evaluates on the training pairs.
    #[arg(long, default_value_t = 0.0)]
    eval_fraction: f64,
    /// Hold the base as f32 instead of quantized (faster matmuls, more memory).
    #[arg(long)]
    dequantize: bool,
}

/// Runs `prefix-rft train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let kind: AdapterKind = serde_json::from_value(Value::String(args.kind.clone()))
        .with_context(|| format!("--kind {} (use lora, prefix or lora+prefix)", args.kind))?;
    if !(0.0..1.0).contains(&args.eval_fraction) {
        bail!("--eval-fraction must be in [0, 1)");
    }
    let loaded = LoadedModel::load(&args.base, LoadOptions::default())
        .with_context(|| format!("loading {}", args.base.display()))?;
    let data = read_data(&args.data, &loaded, args.eval_fraction)?;
    let config = JobConfig {
        kind: Some(kind),
        lora: LoraSpec {
            rank: args.rank,
            alpha: args.lora_alpha,
            target_modules: args.target_modules.clone(),
        },
        prefix: Some(PrefixSpec {
            num_virtual_tokens: args.num_virtual_tokens,
            init_std: 1.0,
        }),
        params: TrainParams {
            steps: args.steps,
            epochs: args.epochs,
            batch_size: args.batch_size,
            lr: args.lr,
            beta: args.beta,
            alpha: args.sft_weight,
            warmup_ratio: args.warmup_ratio,
            max_grad_norm: args.max_grad_norm,
            seed: args.seed,
            weight_decay: args.weight_decay,
            ..TrainParams::default()
        },
        quantized_base: !args.dequantize,
        rft: None,
    };
    let job = Job {
        base_model: args.base.clone(),
        base_model_name: args
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        parent: args.adapter.clone(),
        config: JobConfig {
            // With a parent, its own kind applies unless --kind was changed from the default.
            kind: if args.adapter.is_some() && args.kind == "lora" {
                None
            } else {
                Some(kind)
            },
            ..config
        },
        data,
        out_dir: args.out.clone(),
    };
    let opts = TrainOptions {
        dtype: DType::F32,
        quantized_base: job.config.quantized_base,
    };
    let model = TrainModel::from_llama(&loaded.model, &Device::Cpu, opts)?;
    drop(loaded);

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    eprintln!(
        "training on {} pairs, {} demonstrations, {} unpaired ({} held-out pairs)",
        job.data.pairs.len(),
        job.data.demonstrations.len(),
        job.data.negatives.len() + job.data.positives.len(),
        job.data.eval_pairs.len()
    );
    let start = Instant::now();
    let out = job::run_on_model(
        &model,
        &job,
        None,
        &mut |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.step as u64);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.2} pairs/s",
                p.loss, p.lr, p.pairs_per_s
            ));
        },
        &|| false,
    )?;
    bar.finish();
    let m = &out.metrics;
    let first = m.losses.first().copied().unwrap_or(f64::NAN);
    let last = m.losses.last().copied().unwrap_or(f64::NAN);
    println!();
    println!("{:<28} {}", "adapter", out.out_dir.display());
    println!("{:<28} {:?}", "kind", out.kind);
    println!("{:<28} {}", "from parent", out.from_parent);
    println!(
        "{:<28} {} / {} / {}",
        "pairs / demos / unpaired", m.examples.0, m.examples.1, m.examples.2
    );
    println!("{:<28} {}", "steps", m.steps);
    println!("{:<28} {first:.4} -> {last:.4}", "loss first -> last");
    println!("{:<28} {:.2}", "pairs/s", m.pairs_per_s);
    println!("{:<28} {:.1}", "train seconds", m.train_seconds);
    println!("{:<28} {:.1}", "reference seconds", m.reference_seconds);
    println!(
        "{:<28} {:.1}",
        "total seconds",
        start.elapsed().as_secs_f64()
    );
    if let (Some(b), Some(a)) = (&m.eval_before, &m.eval_after) {
        let set = if m.eval_held_out {
            "held-out"
        } else {
            "training"
        };
        println!("{:<28} {} {set} pairs", "eval", b.pairs);
        println!(
            "{:<28} {:.3} -> {:.3}",
            "  reward accuracy", b.reward_accuracy, a.reward_accuracy
        );
        println!(
            "{:<28} {:.3} -> {:.3}",
            "  reward margin", b.reward_margin, a.reward_margin
        );
        println!(
            "{:<28} {:.3} -> {:.3}",
            "  log-prob margin", b.logp_margin, a.logp_margin
        );
    }
    Ok(())
}

/// Reads and tokenises the JSON Lines file.
fn read_data(path: &Path, model: &LoadedModel, eval_fraction: f64) -> anyhow::Result<JobData> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut data = JobData::default();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let row: Value = serde_json::from_str(&line).with_context(at)?;
        let row = Row::parse(&row, model).with_context(at)?;
        match row {
            Row::Pair(p) if held_out(&line, eval_fraction) => data.eval_pairs.push(p),
            Row::Pair(p) => data.pairs.push(p),
            Row::Demo(d) => data.demonstrations.push(d),
            Row::Unpaired(c, true) => data.positives.push(c),
            Row::Unpaired(c, false) => data.negatives.push(c),
        }
    }
    Ok(data)
}

/// A deterministic share of rows (FNV-1a of the line, stable across runs and platforms).
fn held_out(line: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in line.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ((h % 10_000) as f64) < fraction * 10_000.0
}

enum Row {
    Pair(PairIds),
    Demo(CompletionIds),
    Unpaired(CompletionIds, bool),
}

impl Row {
    fn parse(row: &Value, model: &LoadedModel) -> anyhow::Result<Row> {
        let field = |k: &str| row.get(k).filter(|v| !v.is_null());
        if let Some(messages) = field("messages") {
            let mut messages = to_messages(messages)?;
            let answer = match messages.pop() {
                Some(m) if m.role == "assistant" => m,
                _ => bail!("`messages` must end with an assistant message"),
            };
            let (prompt, completion) = render(model, &messages, &[answer])?;
            return Ok(Row::Demo(CompletionIds { prompt, completion }));
        }
        let Some(prompt) = field("prompt") else {
            bail!("a row needs `prompt` (with chosen/rejected, completion) or `messages`");
        };
        match (field("chosen"), field("rejected"), field("completion")) {
            (Some(chosen), Some(rejected), None) => {
                let (p, chosen) = encode_pair(model, prompt, chosen)?;
                let (_, rejected) = encode_pair(model, prompt, rejected)?;
                Ok(Row::Pair(PairIds {
                    prompt: p,
                    chosen,
                    rejected,
                }))
            }
            (None, None, Some(completion)) => {
                let (prompt, completion) = encode_pair(model, prompt, completion)?;
                let ids = CompletionIds { prompt, completion };
                match field("label") {
                    None => Ok(Row::Demo(ids)),
                    Some(Value::Bool(label)) => Ok(Row::Unpaired(ids, *label)),
                    Some(_) => bail!("`label` must be true or false"),
                }
            }
            _ => bail!("a row has `chosen` and `rejected`, or `completion`"),
        }
    }
}

fn to_messages(v: &Value) -> anyhow::Result<Vec<ChatMessage>> {
    serde_json::from_value(v.clone()).context("a message list must be [{\"role\", \"content\"}]")
}

/// Prompt and completion ids of one (prompt, completion) in either TRL form.
fn encode_pair(
    model: &LoadedModel,
    prompt: &Value,
    completion: &Value,
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    match (prompt, completion) {
        (Value::String(p), Value::String(c)) => {
            let prompt = model.tokenizer.encode(p, true)?;
            let mut completion = model.tokenizer.encode(c, false)?;
            if let Some(&eos) = model.tokenizer.eos_ids().first() {
                completion.push(eos);
            }
            Ok((prompt, completion))
        }
        (Value::Array(_), Value::Array(_)) => {
            render(model, &to_messages(prompt)?, &to_messages(completion)?)
        }
        _ => bail!("prompt and completion must both be strings or both message lists"),
    }
}

/// Renders `prompt` with the generation prompt and `prompt ++ answer` with the chat template;
/// the completion is the text the answer adds.
fn render(
    model: &LoadedModel,
    prompt: &[ChatMessage],
    answer: &[ChatMessage],
) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let template = model
        .chat_template
        .as_ref()
        .context("message lists need a chat template, and the model has none")?;
    let prompt_text = template.render(prompt, true)?;
    let mut all = prompt.to_vec();
    all.extend_from_slice(answer);
    let full = template.render(&all, false)?;
    let Some(completion_text) = full.strip_prefix(&prompt_text) else {
        bail!("the chat template renders the prompt differently inside the conversation");
    };
    let completion_text = completion_text.trim_end_matches('\n');
    Ok((
        model.tokenizer.encode(&prompt_text, false)?,
        model.tokenizer.encode(completion_text, false)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smol() -> LoadedModel {
        let path = prefix_rft_engine::testing::default_model_path();
        LoadedModel::load(&path, LoadOptions::default()).expect("SmolLM2 loads")
    }

    fn text(model: &LoadedModel, ids: &[u32]) -> String {
        model.tokenizer.decode(ids, false).expect("decode")
    }

    #[test]
    fn parses_trl_rows_of_every_form() {
        let model = smol();
        let conv = json!({
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello friend!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        });
        let Row::Pair(p) = Row::parse(&conv, &model).expect("pair") else {
            panic!("not a pair");
        };
        let prompt = text(&model, &p.prompt);
        assert!(prompt.contains("Hi?"), "{prompt}");
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
        assert_eq!(text(&model, &p.chosen), "Hello friend!<|im_end|>");
        assert_eq!(text(&model, &p.rejected), "Go away.<|im_end|>");

        let plain = json!({"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."});
        let Row::Pair(p) = Row::parse(&plain, &model).expect("pair") else {
            panic!("not a pair");
        };
        assert_eq!(text(&model, &p.prompt), "Say hi.");
        let eos = model.tokenizer.eos_ids()[0];
        assert_eq!(
            p.chosen.last(),
            Some(&eos),
            "TRL appends EOS to string answers"
        );

        let sft = json!({"messages": [
            {"role": "user", "content": "Greet me."},
            {"role": "assistant", "content": "Hello friend!"},
        ]});
        match Row::parse(&sft, &model).expect("sft") {
            Row::Demo(d) => assert_eq!(text(&model, &d.completion), "Hello friend!<|im_end|>"),
            _ => panic!("not a demonstration"),
        }
        let kto = json!({"prompt": "Q", "completion": "A", "label": false});
        assert!(matches!(
            Row::parse(&kto, &model).expect("kto"),
            Row::Unpaired(_, false)
        ));
        let demo = json!({"prompt": "Q", "completion": "A"});
        assert!(matches!(
            Row::parse(&demo, &model).expect("demo"),
            Row::Demo(_)
        ));
    }

    #[test]
    fn refuses_malformed_rows() {
        let model = smol();
        for bad in [
            json!({"chosen": "a", "rejected": "b"}),
            json!({"prompt": "Q", "chosen": "a"}),
            json!({"prompt": "Q", "completion": "A", "label": "yes"}),
            json!({"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}),
            json!({"messages": [{"role": "user", "content": "only a question"}]}),
            json!({"prompt": [{"role": 1}], "chosen": [], "rejected": []}),
        ] {
            assert!(Row::parse(&bad, &model).is_err(), "{bad}");
        }
    }

    #[test]
    fn holds_out_a_stable_share_of_rows() {
        let lines: Vec<String> = (0..2000).map(|i| format!("{{\"row\": {i}}}")).collect();
        let held = lines.iter().filter(|l| held_out(l, 0.15)).count();
        assert!((200..400).contains(&held), "{held}");
        assert!(lines.iter().all(|l| held_out(l, 0.15) == held_out(l, 0.15)));
        assert!(!lines.iter().any(|l| held_out(l, 0.0)));
    }
}
