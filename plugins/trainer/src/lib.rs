//! The Prefix-RFT trainer: the objective ([`objective`]), the training loop ([`train`]), a
//! whole job from GGUF and PEFT files to PEFT files ([`job`]) and, as a cdylib, the trainer
//! plugin the server loads ([`TrainerPlugin`]). The offline CLI calls [`job`] directly, so
//! both run the same code.

pub mod error;
pub mod job;
pub mod objective;
pub mod rft;
pub mod train;

pub use error::TrainerError;

use prefix_rft_engine::train::TrainError;
use prefix_rft_plugin_abi::{
    export_plugin, CallContext, Description, Plugin, PluginError, PluginKind,
};
use serde_json::{json, Value};

/// The trainer plugin: stateless; each `run` loads the base, trains and writes PEFT files.
///
/// Request: a [`job::Job`] as JSON (`base_model`, optional `parent`, `kind`, `lora`, `prefix`,
/// `params`, `quantized_base`, `data` with token ids, `out_dir`), plus the `[[plugins]]`
/// entry's `config` table as defaults ([`job::Job::from_request`]). Reply: a
/// [`job::JobOutput`].
/// Progress: one report per step, `{step, total, loss, lr, grad_norm, pairs_per_s, ...}`.
#[derive(Debug, Default)]
pub struct TrainerPlugin;

impl Plugin for TrainerPlugin {
    const NAME: &'static str = "prefix-rft";
    const KIND: PluginKind = PluginKind::Trainer;

    fn describe(&self) -> Description {
        Description {
            version: env!("CARGO_PKG_VERSION").to_string(),
            summary: "Trains LoRA and prefix adapters with DPO on pairs, SFT on demonstrations \
                      and KTO on unpaired thumbs, from the bare base or a parent version"
                .to_string(),
            config_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "kind": {"enum": ["lora", "prefix", "lora+prefix"]},
                    "lora": {"type": "object", "properties": {
                        "rank": {"type": "integer", "minimum": 1},
                        "alpha": {"type": "number"},
                        "target_modules": {"type": "array", "items": {"type": "string"}}
                    }},
                    "prefix": {"type": "object", "properties": {
                        "num_virtual_tokens": {"type": "integer", "minimum": 1},
                        "init_std": {"type": "number", "minimum": 0}
                    }},
                    "params": {"type": "object"},
                    "quantized_base": {"type": "boolean"}
                }
            }),
        }
    }

    fn validate_config(&self, config: &Value) -> Result<(), PluginError> {
        let cfg: job::JobConfig = serde_json::from_value(config.clone())
            .map_err(|e| PluginError::invalid_config(e.to_string()))?;
        cfg.validate()
            .map_err(|e| PluginError::invalid_config(e.to_string()))
    }

    fn run(&self, request: Value, ctx: &CallContext<'_>) -> Result<Value, PluginError> {
        // Training yields the cores to serving: lowest priority, and never the serving
        // forward's compute pool (candle's own threads are lowered by the host).
        prefix_rft_engine::quant::background_thread();
        let job = job::Job::from_request(request)
            .map_err(|e| PluginError::invalid_request(e.to_string()))?;
        let mut report = |p: &train::Progress| {
            let detail = serde_json::to_value(p).unwrap_or(Value::Null);
            ctx.progress(p.step as f64 / p.total.max(1) as f64, &detail);
        };
        let rewarder = HostRewarder { ctx };
        let out = job::run(&job, Some(&rewarder), &mut report, &|| ctx.is_cancelled())
            .map_err(to_plugin_error)?;
        serde_json::to_value(&out).map_err(|e| PluginError::new(format!("reply: {e}")))
    }
}

/// Scores RFT rollouts with the host's `reward` service: request `{"prompt": [ids],
/// "completions": [[ids], ...]}`, reply `{"scores": [f64, ...]}` (the host decodes the ids and
/// asks the adapter's reward plugin).
struct HostRewarder<'c, 'a> {
    ctx: &'c CallContext<'a>,
}

impl rft::Rewarder for HostRewarder<'_, '_> {
    fn score(&self, prompt: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f64>, String> {
        let reply = self
            .ctx
            .host_call(
                "reward",
                &json!({"prompt": prompt, "completions": completions}),
            )
            .map_err(|e| e.message)?;
        reply
            .get("scores")
            .and_then(Value::as_array)
            .and_then(|s| s.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| {
                format!("the host's reward reply has no `scores` list of numbers: {reply}")
            })
    }
}

fn to_plugin_error(e: TrainerError) -> PluginError {
    match e {
        TrainerError::Cancelled { .. } => PluginError::cancelled(),
        TrainerError::Data(_)
        | TrainerError::Params(_)
        | TrainerError::Parent(_)
        | TrainerError::Forward(
            TrainError::TokenOutOfRange { .. } | TrainError::ContextLength { .. },
        ) => PluginError::invalid_request(e.to_string()),
        other => PluginError::new(other.to_string()),
    }
}

export_plugin!(TrainerPlugin);
