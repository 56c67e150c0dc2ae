//! A whole training job as the plugin and the offline CLI run it: load the base GGUF (and
//! the parent's PEFT files), train with [`crate::train::Trainer`], write PEFT files.
//!
//! [`JobConfig`] is the part the server keeps per adapter (what to train, how); [`Job`] adds
//! the base model, the parent, the data and where to write. Both deserialise from the JSON the
//! host sends, refusing unknown fields, and are checked before any model is loaded.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use prefix_rft_adapters::peft::{self, AdapterKind, Limits};
use prefix_rft_engine::gguf::GgufFile;
use prefix_rft_engine::model::{Llama, LoadOptions, Proj};
use prefix_rft_engine::train::{LoraConfig, PrefixConfig, TrainModel, TrainOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::TrainerError;
use crate::rft::{Rewarder, RftParams};
use crate::train::{
    Dataset, Demonstration, Pair, Progress, TrainMetrics, TrainParams, Trainer, Unpaired,
};

/// LoRA shape of a new adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank r.
    pub rank: usize,
    /// `lora_alpha`; `2·r` when unset.
    pub alpha: Option<f64>,
    /// Module names (`q_proj`, ..., `down_proj`); all seven when unset or `["all-linear"]`.
    pub target_modules: Option<Vec<String>>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            rank: 16,
            alpha: None,
            target_modules: None,
        }
    }
}

/// Prefix shape of a new adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixSpec {
    /// Virtual tokens per layer.
    pub num_virtual_tokens: usize,
    /// Standard deviation of the initial virtual keys/values (PEFT's embedding init is 1).
    #[serde(default = "default_prefix_std")]
    pub init_std: f64,
}

fn default_prefix_std() -> f64 {
    1.0
}

/// How to train an adapter: the per-adapter part of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// What a new adapter carries; with a parent, must match the parent's kind when given.
    pub kind: Option<AdapterKind>,
    /// LoRA shape of a new adapter.
    pub lora: LoraSpec,
    /// Prefix shape of a new adapter (needed for `prefix` and `lora+prefix`).
    pub prefix: Option<PrefixSpec>,
    /// Hyper-parameters.
    pub params: TrainParams,
    /// Keep the base quantized (less memory, CPU only) instead of an f32 copy.
    pub quantized_base: bool,
    /// Prefix-guided RFT on the demonstrations, scored by the adapter's reward (the caller
    /// supplies it: the host's `reward` service in the plugin).
    pub rft: Option<RftParams>,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            kind: None,
            lora: LoraSpec::default(),
            prefix: None,
            params: TrainParams::default(),
            quantized_base: true,
            rft: None,
        }
    }
}

/// Token ids of one preference pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairIds {
    /// Prompt.
    pub prompt: Vec<u32>,
    /// Preferred completion.
    pub chosen: Vec<u32>,
    /// Dispreferred completion.
    pub rejected: Vec<u32>,
}

/// Token ids of one prompt and completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionIds {
    /// Prompt.
    pub prompt: Vec<u32>,
    /// Completion.
    pub completion: Vec<u32>,
}

/// Tokenised data of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobData {
    /// Preference pairs (DPO).
    pub pairs: Vec<PairIds>,
    /// Demonstrations (SFT).
    pub demonstrations: Vec<CompletionIds>,
    /// Unpaired thumbs down (KTO, undesirable).
    pub negatives: Vec<CompletionIds>,
    /// Unpaired thumbs up (KTO, desirable).
    pub positives: Vec<CompletionIds>,
    /// Held-out pairs for the eval gate.
    pub eval_pairs: Vec<PairIds>,
}

impl JobData {
    /// The trainer's form of the data.
    pub fn to_dataset(&self) -> Dataset {
        let pair = |p: &PairIds| Pair {
            prompt: p.prompt.clone(),
            chosen: p.chosen.clone(),
            rejected: p.rejected.clone(),
        };
        let unpaired = |c: &CompletionIds, desirable| Unpaired {
            prompt: c.prompt.clone(),
            completion: c.completion.clone(),
            desirable,
        };
        Dataset {
            pairs: self.pairs.iter().map(pair).collect(),
            demonstrations: self
                .demonstrations
                .iter()
                .map(|d| Demonstration {
                    prompt: d.prompt.clone(),
                    completion: d.completion.clone(),
                })
                .collect(),
            unpaired: self
                .negatives
                .iter()
                .map(|c| unpaired(c, false))
                .chain(self.positives.iter().map(|c| unpaired(c, true)))
                .collect(),
            eval_pairs: self.eval_pairs.iter().map(pair).collect(),
        }
    }
}

/// One training job.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "RawJob")]
pub struct Job {
    /// The base model's GGUF file.
    pub base_model: PathBuf,
    /// Name written as `base_model_name_or_path` (the GGUF path when unset).
    pub base_model_name: Option<String>,
    /// Directory of the parent version's PEFT files, if any.
    pub parent: Option<PathBuf>,
    /// What and how to train (its fields sit at the top level of the JSON).
    pub config: JobConfig,
    /// Training data.
    pub data: JobData,
    /// Where the new PEFT files are written (created if missing).
    pub out_dir: PathBuf,
}

/// The wire form of [`Job`]: one flat object (serde's `flatten` cannot refuse unknown fields).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    base_model: PathBuf,
    #[serde(default)]
    base_model_name: Option<String>,
    #[serde(default)]
    parent: Option<PathBuf>,
    #[serde(default)]
    kind: Option<AdapterKind>,
    #[serde(default)]
    lora: LoraSpec,
    #[serde(default)]
    prefix: Option<PrefixSpec>,
    #[serde(default)]
    params: TrainParams,
    #[serde(default = "default_quantized_base")]
    quantized_base: bool,
    #[serde(default)]
    rft: Option<RftParams>,
    data: JobData,
    out_dir: PathBuf,
}

fn default_quantized_base() -> bool {
    JobConfig::default().quantized_base
}

impl From<RawJob> for Job {
    fn from(r: RawJob) -> Job {
        Job {
            base_model: r.base_model,
            base_model_name: r.base_model_name,
            parent: r.parent,
            config: JobConfig {
                kind: r.kind,
                lora: r.lora,
                prefix: r.prefix,
                params: r.params,
                quantized_base: r.quantized_base,
                rft: r.rft,
            },
            data: r.data,
            out_dir: r.out_dir,
        }
    }
}

impl Job {
    /// Reads a plugin `run` request. The host adds the `[[plugins]]` entry's `config` table (a
    /// [`JobConfig`]: the operator's defaults) as `config`; the request's own fields win over
    /// it, field by field inside `lora`, `prefix` and `params`.
    pub fn from_request(request: Value) -> Result<Job, serde_json::Error> {
        let Value::Object(mut fields) = request else {
            return serde_json::from_value(request);
        };
        match fields.remove("config") {
            None | Some(Value::Null) => {}
            Some(Value::Object(defaults)) => {
                // A typo in the operator's table is refused like one in the request.
                serde_json::from_value::<JobConfig>(Value::Object(defaults.clone()))?;
                for (key, default) in defaults {
                    match (fields.get_mut(&key), default) {
                        (Some(Value::Object(own)), Value::Object(default)) => {
                            for (k, v) in default {
                                own.entry(k).or_insert(v);
                            }
                        }
                        (Some(_), _) => {}
                        (None, default) => {
                            fields.insert(key, default);
                        }
                    }
                }
            }
            Some(other) => {
                return Err(serde::de::Error::custom(format!(
                    "`config` must be an object of job defaults, got {other}"
                )))
            }
        }
        serde_json::from_value(Value::Object(fields))
    }
}

/// What a finished job reports.
#[derive(Debug, Clone, Serialize)]
pub struct JobOutput {
    /// The directory holding the new PEFT files.
    pub out_dir: PathBuf,
    /// What the adapter carries.
    pub kind: AdapterKind,
    /// True when training continued from a parent.
    pub from_parent: bool,
    /// The run's metrics.
    pub metrics: TrainMetrics,
}

impl JobConfig {
    /// Checks everything that does not need the model.
    pub fn validate(&self) -> Result<(), TrainerError> {
        self.params.validate()?;
        if let Some(rft) = &self.rft {
            rft.validate()?;
        }
        if let Some(kind) = self.kind {
            self.lora_config(kind, 0)?;
            self.prefix_config(kind, 0)?;
        }
        Ok(())
    }

    fn lora_config(
        &self,
        kind: AdapterKind,
        seed: u64,
    ) -> Result<Option<LoraConfig>, TrainerError> {
        if kind == AdapterKind::Prefix {
            return Ok(None);
        }
        let spec = &self.lora;
        if spec.rank == 0 {
            return Err(TrainerError::Params("lora.rank must be positive".into()));
        }
        let targets = match &spec.target_modules {
            None => Proj::ALL.to_vec(),
            Some(names) if names.iter().any(|n| n == "all-linear") => Proj::ALL.to_vec(),
            Some(names) => {
                let mut out = Vec::new();
                for n in names {
                    let p = Proj::from_module_name(n).ok_or_else(|| {
                        TrainerError::Params(format!(
                            "lora.target_modules: unknown module {n:?} (use q_proj, k_proj, \
                             v_proj, o_proj, gate_proj, up_proj, down_proj)"
                        ))
                    })?;
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
                if out.is_empty() {
                    return Err(TrainerError::Params("lora.target_modules is empty".into()));
                }
                out
            }
        };
        let alpha = spec.alpha.unwrap_or(2.0 * spec.rank as f64);
        if !alpha.is_finite() {
            return Err(TrainerError::Params("lora.alpha must be finite".into()));
        }
        Ok(Some(LoraConfig {
            rank: spec.rank,
            alpha,
            rslora: false,
            targets,
            seed,
        }))
    }

    fn prefix_config(
        &self,
        kind: AdapterKind,
        seed: u64,
    ) -> Result<Option<PrefixConfig>, TrainerError> {
        if kind == AdapterKind::Lora {
            return Ok(None);
        }
        let spec = self.prefix.as_ref().ok_or_else(|| {
            TrainerError::Params("a prefix adapter needs prefix.num_virtual_tokens".into())
        })?;
        if spec.num_virtual_tokens == 0
            || spec.num_virtual_tokens > Limits::default().max_virtual_tokens
        {
            return Err(TrainerError::Params(format!(
                "prefix.num_virtual_tokens = {} must be in 1..={}",
                spec.num_virtual_tokens,
                Limits::default().max_virtual_tokens
            )));
        }
        if !(spec.init_std.is_finite() && spec.init_std >= 0.0) {
            return Err(TrainerError::Params(
                "prefix.init_std must be finite and non-negative".into(),
            ));
        }
        Ok(Some(PrefixConfig {
            num_virtual_tokens: spec.num_virtual_tokens,
            init_std: spec.init_std,
            seed,
        }))
    }
}

/// Loads the base GGUF into a training forward on the CPU.
pub fn load_model(path: &Path, quantized_base: bool) -> Result<TrainModel, TrainerError> {
    let model_err = |e: String| TrainerError::Model(format!("{}: {e}", path.display()));
    let file = GgufFile::open(path).map_err(|e| model_err(e.to_string()))?;
    let llama =
        Llama::from_gguf(&file, LoadOptions::default()).map_err(|e| model_err(e.to_string()))?;
    let opts = TrainOptions {
        dtype: DType::F32,
        quantized_base,
    };
    Ok(TrainModel::from_llama(&llama, &Device::Cpu, opts)?)
}

/// Runs `job` on an already loaded `model` (the CLI and tests reuse one model); `rewarder`
/// scores the RFT rollouts when the job asks for RFT.
pub fn run_on_model(
    model: &TrainModel,
    job: &Job,
    rewarder: Option<&dyn Rewarder>,
    on_progress: &mut dyn FnMut(&Progress),
    cancelled: &dyn Fn() -> bool,
) -> Result<JobOutput, TrainerError> {
    let cfg = &job.config;
    cfg.validate()?;
    let data = job.data.to_dataset();
    let seed = cfg.params.seed;
    let (trainer, kind) = match &job.parent {
        Some(dir) => {
            let parent = peft::load_dir(dir, model.config(), &Limits::default())?;
            let kind = parent.kind();
            if let Some(want) = cfg.kind {
                if want != kind {
                    return Err(TrainerError::Parent(format!(
                        "the job asks for a {want:?} adapter but the parent is {kind:?}"
                    )));
                }
            }
            let t = Trainer::from_parent(model, &parent.weights, cfg.params.clone())?;
            (t, kind)
        }
        None => {
            let kind = cfg.kind.unwrap_or(AdapterKind::Lora);
            let lora = cfg.lora_config(kind, seed)?;
            let prefix = cfg.prefix_config(kind, seed)?;
            let t = Trainer::fresh(model, lora.as_ref(), prefix.as_ref(), cfg.params.clone())?;
            (t, kind)
        }
    };
    let trainer = match (&cfg.rft, rewarder) {
        (None, _) => trainer,
        (Some(rft), Some(rewarder)) => trainer.with_rft(rft.clone(), rewarder)?,
        (Some(_), None) => {
            return Err(TrainerError::Reward(
                "the job asks for RFT but nothing scores its rollouts".into(),
            ))
        }
    };
    let out = trainer.run(&data, on_progress, cancelled)?;
    let name = job
        .base_model_name
        .clone()
        .unwrap_or_else(|| job.base_model.display().to_string());
    let files = peft::to_files(&out.weights, model.config(), &name)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainerError::Io { path, source }
    };
    std::fs::create_dir_all(&job.out_dir).map_err(io(&job.out_dir))?;
    let config_path = job.out_dir.join(peft::CONFIG_FILE);
    let weights_path = job.out_dir.join(peft::WEIGHTS_FILE);
    std::fs::write(&config_path, &files.config).map_err(io(&config_path))?;
    std::fs::write(&weights_path, &files.weights).map_err(io(&weights_path))?;
    Ok(JobOutput {
        out_dir: job.out_dir.clone(),
        kind,
        from_parent: job.parent.is_some(),
        metrics: out.metrics,
    })
}

/// Loads the base model and runs `job`.
pub fn run(
    job: &Job,
    rewarder: Option<&dyn Rewarder>,
    on_progress: &mut dyn FnMut(&Progress),
    cancelled: &dyn Fn() -> bool,
) -> Result<JobOutput, TrainerError> {
    job.config.validate()?;
    let model = load_model(&job.base_model, job.config.quantized_base)?;
    run_on_model(&model, job, rewarder, on_progress, cancelled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request() -> Value {
        json!({
            "base_model": "m.gguf",
            "params": {"steps": 3, "lr": 0.001},
            "lora": {"rank": 4},
            "data": {},
            "out_dir": "out",
        })
    }

    #[test]
    fn plugin_config_fills_what_the_request_leaves_unset() {
        let mut r = request();
        r["config"] = json!({
            "kind": "lora",
            "lora": {"rank": 32, "alpha": 8.0},
            "params": {"steps": 99, "beta": 0.5},
            "quantized_base": false,
        });
        let job = Job::from_request(r).expect("parses");
        assert_eq!(job.config.kind, Some(AdapterKind::Lora));
        assert_eq!(
            (job.config.lora.rank, job.config.lora.alpha),
            (4, Some(8.0))
        );
        assert_eq!(job.config.params.steps, Some(3));
        assert_eq!(job.config.params.lr, 0.001);
        assert_eq!(job.config.params.beta, 0.5);
        assert!(!job.config.quantized_base);
    }

    #[test]
    fn a_bad_plugin_config_is_refused_naming_the_field() {
        for config in [
            json!({"lora": {"rank": 4, "rnak": 8}}),
            json!({"epochz": 1}),
            json!(3),
        ] {
            let mut r = request();
            r["config"] = config.clone();
            let e = Job::from_request(r).expect_err("refused");
            assert!(
                ["rnak", "epochz", "config"]
                    .iter()
                    .any(|w| e.to_string().contains(w)),
                "{config}: {e}"
            );
        }
        let mut r = request();
        r["config"] = Value::Null;
        assert!(Job::from_request(r).is_ok(), "null config is no config");
    }
}
