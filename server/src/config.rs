//! `config.toml`: parsed into raw serde types, then validated into the form the rest of the
//! program trusts. Unknown keys are refused so a typo is an error, not a silent default.

use std::path::{Path, PathBuf};

use prefix_rft_engine::quant::Activations;
use serde::Deserialize;

/// The configuration embedded in the binary (the repository's `config.toml`).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config.toml");

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Bind address.
    pub host: String,
    /// Bind port.
    pub port: u16,
    /// Adapter store and feedback database root.
    pub data_dir: PathBuf,
    /// Seconds a shutdown drain waits for running requests.
    #[serde(default = "default_drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// The only directory plugins are loaded from.
    #[serde(default = "default_plugin_dir")]
    pub plugin_dir: PathBuf,
}

fn default_plugin_dir() -> PathBuf {
    PathBuf::from("target/release")
}

fn default_drain_timeout_secs() -> u64 {
    30
}

/// `[limits]`: what one request may ask for and how much the scheduler holds at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Largest and default `max_tokens`.
    pub max_tokens: usize,
    /// Largest prompt in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most prompts in one `/v1/completions` request.
    pub max_prompts: usize,
    /// Sequences one tenant may have admitted at once.
    pub tenant_max_sequences: usize,
    /// Tokens (prompt + `max_tokens`, per sequence) one tenant may have admitted at once.
    pub tenant_max_tokens: usize,
    /// Sequences decoded together.
    pub max_batch_size: usize,
    /// Requests waiting for a slot before 429.
    pub max_queue: usize,
    /// Tokens per scheduler step (decode + prefill).
    pub step_token_budget: usize,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// `Retry-After` seconds on 429.
    pub retry_after_secs: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_body_bytes: 4 << 20,
            max_tokens: 2048,
            max_prompt_tokens: 8192,
            max_n: 8,
            max_prompts: 16,
            tenant_max_sequences: 64,
            tenant_max_tokens: 262144,
            max_batch_size: 32,
            max_queue: 64,
            step_token_budget: 256,
            prefill_chunk: 128,
            retry_after_secs: 1,
        }
    }
}

/// `[feedback]`: the completion and feedback database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackSection {
    /// SQLite file; a relative path is resolved against `[server] data_dir`.
    pub path: PathBuf,
    /// Days a completion without feedback is kept (0 keeps it forever).
    pub retention_days: u64,
    /// Largest `correction` or `comment` in bytes (413 above).
    pub max_text_bytes: usize,
}

impl Default for FeedbackSection {
    fn default() -> Self {
        FeedbackSection {
            path: PathBuf::from("feedback.sqlite"),
            retention_days: 30,
            max_text_bytes: 64 << 10,
        }
    }
}

/// `[training]`: which trainer runs, when jobs start by themselves, and the eval gate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    /// `builtin` (the bundled trainer, run inside the server) or a `[[plugins]]` name of kind
    /// `trainer`.
    pub trainer: String,
    /// Start jobs automatically when an adapter has enough new feedback.
    pub auto: bool,
    /// Automatic trigger: new (untrained, not held-out) examples an adapter needs.
    pub min_new_examples: usize,
    /// Automatic trigger: seconds since the adapter's last job started.
    pub cooldown_secs: u64,
    /// How often the automatic trigger looks, in seconds.
    pub poll_interval_secs: u64,
    /// Jobs that train at the same time, over all adapters (one per adapter at any time).
    pub max_concurrent_jobs: usize,
    /// Share of prompts whose pairs are held out for the eval gate (by a hash of the prompt).
    pub eval_fraction: f64,
    /// Gate: largest mean per-token KL(adapter ‖ base) on the probe prompts, in nats.
    pub max_kl: f64,
    /// Probe prompts (user messages) of the KL measure; empty uses a built-in set.
    pub probe_prompts: Vec<String>,
    /// Finished jobs kept in the job list (and on disk).
    pub keep_jobs: usize,
    /// Largest growth of the server's resident memory while a job trains, in MiB; past it the
    /// job is stopped and fails while serving goes on. 0 leaves it unbounded.
    pub max_memory_mib: u64,
    /// Longest a job may train, in seconds (with the trainer plugin's own `timeout_secs`, the
    /// shorter counts); past it the job is asked to stop and fails. 0 leaves only the plugin's.
    pub max_job_secs: u64,
    /// Hyper-parameters of every job unless its request overrides them.
    pub params: prefix_rft_trainer::train::TrainParams,
    /// Adapters whose jobs add prefix-guided RFT, each with its reward plugin.
    pub rewards: Vec<RewardEntry>,
    /// Hyper-parameters of the RFT term (the model's end-of-turn tokens are added as stop
    /// tokens).
    pub rft: prefix_rft_trainer::rft::RftParams,
}

/// `[[training.rewards]]`: an adapter trained with prefix-guided RFT on its demonstrations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardEntry {
    /// `tenant/adapter`.
    pub adapter: String,
    /// A `[[plugins]]` entry of kind `reward`.
    pub plugin: String,
    /// What the plugin scores by for this adapter (reward-rules: `rules`); the `[[plugins]]`
    /// entry's `config` when unset.
    #[serde(default)]
    pub config: serde_json::Value,
}

impl Default for TrainingSection {
    fn default() -> Self {
        TrainingSection {
            trainer: "builtin".into(),
            auto: true,
            min_new_examples: 8,
            cooldown_secs: 60,
            poll_interval_secs: 10,
            max_concurrent_jobs: 1,
            eval_fraction: 0.15,
            max_kl: 1.0,
            probe_prompts: Vec::new(),
            keep_jobs: 1000,
            max_memory_mib: 2048,
            max_job_secs: 21600,
            params: prefix_rft_trainer::train::TrainParams {
                lr: 1e-4,
                ..Default::default()
            },
            rewards: Vec::new(),
            rft: Default::default(),
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Base model id clients send as `model`.
    pub id: String,
    /// GGUF file or Hugging Face directory.
    pub path: PathBuf,
    /// Dequantise weights to f32 at load.
    #[serde(default)]
    pub dequantize: bool,
    /// What quantized weights do with activations: "int8" (as llama.cpp) or "f32"
    /// (weight-only quantization).
    #[serde(default)]
    pub activations: Activations,
    /// Compute threads (0 = one per core).
    #[serde(default)]
    pub threads: usize,
    /// What generates tokens.
    #[serde(default)]
    pub backend: ModelBackend,
    /// mistralrs backend: adapter versions loaded at once, each a merged copy of the model
    /// (0 = adapters are refused on that backend).
    #[serde(default = "default_mistralrs_max_live")]
    pub mistralrs_max_live: usize,
}

fn default_mistralrs_max_live() -> usize {
    2
}

/// `[model] backend`: the forward that generates tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelBackend {
    /// Our engine: per-request adapters, scoring and training share its forward.
    #[default]
    Engine,
    /// mistralrs on the same GGUF (cargo feature `mistralrs`); scoring stays on our engine.
    Mistralrs,
}

/// `[[tenants]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    /// Tenant id.
    pub id: String,
    /// Keys that act as this tenant.
    pub api_keys: Vec<String>,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Admin keys.
    pub api_keys: Vec<String>,
}

/// `[adapters]`: the versioned store, limits on what may be loaded, and the resident budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptersSection {
    /// Store root; relative paths are under `server.data_dir`.
    pub dir: PathBuf,
    /// Largest LoRA rank accepted.
    pub max_rank: usize,
    /// Largest `adapter_model.safetensors` accepted, in bytes.
    pub max_file_bytes: u64,
    /// Most prefix-tuning virtual tokens accepted.
    pub max_virtual_tokens: usize,
    /// Adapter weights kept in memory, in MiB, before least-recently-used ones are dropped.
    pub resident_budget_mib: usize,
    /// Versions kept per adapter; older ones are deleted unless current or in use.
    pub retain_versions: usize,
    /// Adapters (`tenant/name`) always kept resident.
    pub pinned: Vec<String>,
}

impl Default for AdaptersSection {
    fn default() -> Self {
        AdaptersSection {
            dir: PathBuf::from("adapters"),
            max_rank: 64,
            max_file_bytes: 256 << 20,
            max_virtual_tokens: 128,
            resident_budget_mib: 1024,
            retain_versions: 10,
            pinned: Vec::new(),
        }
    }
}

impl Config {
    /// The adapter store's root directory.
    pub fn adapters_dir(&self) -> PathBuf {
        self.server.data_dir.join(&self.adapters.dir)
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`
    pub server: ServerSection,
    /// `[model]`
    pub model: ModelSection,
    /// `[[tenants]]`
    #[serde(default)]
    pub tenants: Vec<TenantSection>,
    /// `[admin]`
    pub admin: AdminSection,
    /// `[limits]`
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[adapters]`
    #[serde(default)]
    pub adapters: AdaptersSection,
    /// `[[plugins]]`
    #[serde(default)]
    pub plugins: Vec<prefix_rft_plugin_abi::host::PluginConfig>,
    /// `[feedback]`
    #[serde(default)]
    pub feedback: FeedbackSection,
    /// `[training]`
    #[serde(default)]
    pub training: TrainingSection,
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_string(),
            source,
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// The feedback database file: `[feedback] path`, under `data_dir` when relative.
    pub fn feedback_path(&self) -> PathBuf {
        if self.feedback.path.is_absolute() {
            self.feedback.path.clone()
        } else {
            self.server.data_dir.join(&self.feedback.path)
        }
    }

    /// Reads `path`, or the embedded default when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            None => Self::parse(EMBEDDED_DEFAULT, "embedded config.toml"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::parse(&text, &p.display().to_string())
            }
        }
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })
        };
        if self.model.id.trim().is_empty() {
            return invalid("model.id must not be empty".into());
        }
        let mut seen_ids = std::collections::HashSet::new();
        let mut seen_keys = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.id.trim().is_empty() || !seen_ids.insert(t.id.as_str()) {
                return invalid(format!("tenant id `{}` is empty or repeated", t.id));
            }
            // Tenant ids name directories of the adapter store; `admin` labels admin requests.
            if let Err(e) = prefix_rft_adapters::store::check_name("tenant id", &t.id) {
                return invalid(e.to_string());
            }
            if t.id == "admin" {
                return invalid("tenant id `admin` is reserved for admin keys".into());
            }
            for k in &t.api_keys {
                if k.is_empty() || !seen_keys.insert(k.as_str()) {
                    return invalid(format!(
                        "tenant `{}` has an empty or repeated API key",
                        t.id
                    ));
                }
            }
        }
        for k in &self.admin.api_keys {
            if k.is_empty() || !seen_keys.insert(k.as_str()) {
                return invalid("admin has an empty API key or one shared with a tenant".into());
            }
        }
        let l = &self.limits;
        for (name, v) in [
            ("max_body_bytes", l.max_body_bytes),
            ("max_tokens", l.max_tokens),
            ("max_prompt_tokens", l.max_prompt_tokens),
            ("max_n", l.max_n),
            ("max_prompts", l.max_prompts),
            ("tenant_max_sequences", l.tenant_max_sequences),
            ("tenant_max_tokens", l.tenant_max_tokens),
            ("max_batch_size", l.max_batch_size),
            ("step_token_budget", l.step_token_budget),
            ("prefill_chunk", l.prefill_chunk),
        ] {
            if v == 0 {
                return invalid(format!("limits.{name} must be at least 1"));
            }
        }
        let a = &self.adapters;
        if a.max_rank == 0 || a.max_file_bytes == 0 || a.max_virtual_tokens == 0 {
            return invalid(
                "adapters.max_rank, max_file_bytes and max_virtual_tokens must be at least 1"
                    .into(),
            );
        }
        if a.retain_versions == 0 {
            return invalid("adapters.retain_versions must be at least 1".into());
        }
        for p in &a.pinned {
            if p.split_once('/')
                .is_none_or(|(t, n)| t.is_empty() || n.is_empty())
            {
                return invalid(format!("adapters.pinned entry `{p}` must be `tenant/name`"));
            }
        }
        let mut plugin_names = std::collections::HashSet::new();
        for p in &self.plugins {
            p.validate().or_else(|m| invalid(format!("plugins: {m}")))?;
            if !plugin_names.insert(p.name.as_str()) {
                return invalid(format!("plugins: name `{}` is repeated", p.name));
            }
        }
        if self.feedback.max_text_bytes == 0 || self.feedback.path.as_os_str().is_empty() {
            return invalid(
                "feedback.path must be set and feedback.max_text_bytes at least 1".into(),
            );
        }
        let t = &self.training;
        if t.max_concurrent_jobs == 0 || t.poll_interval_secs == 0 || t.keep_jobs == 0 {
            return invalid(
                "training.max_concurrent_jobs, poll_interval_secs and keep_jobs must be at least 1"
                    .into(),
            );
        }
        if !(0.0..0.9).contains(&t.eval_fraction) {
            return invalid("training.eval_fraction must be in [0, 0.9)".into());
        }
        if !(t.max_kl.is_finite() && t.max_kl > 0.0) {
            return invalid("training.max_kl must be a positive number".into());
        }
        if let Err(e) = t.params.validate() {
            return invalid(format!("training.params: {e}"));
        }
        if t.trainer != "builtin"
            && !self.plugins.iter().any(|p| {
                p.name == t.trainer && p.kind == prefix_rft_plugin_abi::PluginKind::Trainer
            })
        {
            return invalid(format!(
                "training.trainer `{}` is neither `builtin` nor a [[plugins]] entry of kind trainer",
                t.trainer
            ));
        }
        let mut rewarded = std::collections::HashSet::new();
        for r in &t.rewards {
            let known = r.adapter.split_once('/').is_some_and(|(tenant, name)| {
                !name.is_empty() && self.tenants.iter().any(|x| x.id == tenant)
            });
            if !known {
                return invalid(format!(
                    "training.rewards: `{}` is not `tenant/adapter` with a configured tenant",
                    r.adapter
                ));
            }
            if !rewarded.insert(r.adapter.as_str()) {
                return invalid(format!("training.rewards: `{}` is listed twice", r.adapter));
            }
            if !self
                .plugins
                .iter()
                .any(|p| p.name == r.plugin && p.kind == prefix_rft_plugin_abi::PluginKind::Reward)
            {
                return invalid(format!(
                    "training.rewards: `{}` is not a [[plugins]] entry of kind reward",
                    r.plugin
                ));
            }
        }
        if let Err(e) = t.rft.validate() {
            return invalid(match e {
                prefix_rft_trainer::TrainerError::Params(m) => format!("training.{m}"),
                other => other.to_string(),
            });
        }
        if l.max_n > l.max_batch_size {
            return invalid("limits.max_n must not exceed limits.max_batch_size".into());
        }
        if l.max_n > l.tenant_max_sequences {
            return invalid("limits.max_n must not exceed limits.tenant_max_sequences".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let cfg = Config::load(None).expect("embedded config");
        assert_eq!(cfg.model.id, "smollm2-135m-instruct");
        assert_eq!(cfg.tenants.len(), 2);
        assert_eq!(cfg.server.port, 8080);
    }

    #[test]
    fn embedded_default_documents_limits() {
        let cfg = Config::load(None).expect("embedded config");
        assert_eq!(cfg.limits.max_body_bytes, 4 << 20);
        assert_eq!(cfg.limits.max_n, 8);
        assert_eq!(cfg.server.drain_timeout_secs, 30);
    }

    #[test]
    fn feedback_database_lives_under_the_data_dir() {
        let mut cfg = Config::load(None).expect("embedded config");
        assert_eq!(cfg.feedback_path(), PathBuf::from("data/feedback.sqlite"));
        assert_eq!(cfg.feedback.retention_days, 30);
        assert_eq!(cfg.feedback.max_text_bytes, 65536);
        cfg.feedback.path = PathBuf::from("/var/lib/fb.sqlite");
        assert_eq!(cfg.feedback_path(), PathBuf::from("/var/lib/fb.sqlite"));
    }

    #[test]
    fn refuses_zero_batch_size() {
        let text = EMBEDDED_DEFAULT.replace("max_batch_size = 32", "max_batch_size = 0");
        let err = Config::parse(&text, "t")
            .expect_err("zero must fail")
            .to_string();
        assert!(err.contains("max_batch_size"), "{err}");
    }

    #[test]
    fn activations_default_to_int8_and_take_f32_only_by_name() {
        let cfg = Config::load(None).expect("embedded config");
        assert_eq!(cfg.model.activations, Activations::Int8);
        let f32 = EMBEDDED_DEFAULT.replace("activations = \"int8\"", "activations = \"f32\"");
        let cfg = Config::parse(&f32, "t").expect("f32");
        assert_eq!(cfg.model.activations, Activations::F32);
        let bad = EMBEDDED_DEFAULT.replace("activations = \"int8\"", "activations = \"fp16\"");
        let err = Config::parse(&bad, "t").expect_err("fp16").to_string();
        assert!(err.contains("fp16") && err.contains("int8"), "{err}");
    }

    #[test]
    fn refuses_unknown_keys() {
        let text = EMBEDDED_DEFAULT.replace("dequantize = false", "dequantise = false");
        let err = Config::parse(&text, "t")
            .expect_err("typo must fail")
            .to_string();
        assert!(err.contains("dequantise"), "{err}");
    }

    #[test]
    fn refuses_tenant_ids_the_store_cannot_hold_and_the_admin_label() {
        for bad in ["a/b", "..", "admin", "has space"] {
            let text = EMBEDDED_DEFAULT.replace("id = \"globex\"", &format!("id = {bad:?}"));
            let err = Config::parse(&text, "t").expect_err(bad).to_string();
            assert!(err.contains("tenant id"), "{bad}: {err}");
        }
    }

    #[test]
    fn refuses_bad_reward_entries() {
        let base = format!(
            "{EMBEDDED_DEFAULT}\n[[plugins]]\nname = \"rules\"\npath = \"r.so\"\nkind = \"reward\"\n"
        );
        let with = |entry: &str| format!("{base}\n[[training.rewards]]\n{entry}\n");
        assert!(
            Config::parse(&with("adapter = \"acme/support\"\nplugin = \"rules\""), "t").is_ok()
        );
        for (entry, expect) in [
            (
                "adapter = \"nobody/support\"\nplugin = \"rules\"",
                "tenant/adapter",
            ),
            ("adapter = \"acme\"\nplugin = \"rules\"", "tenant/adapter"),
            (
                "adapter = \"acme/support\"\nplugin = \"missing\"",
                "kind reward",
            ),
        ] {
            let err = Config::parse(&with(entry), "t")
                .expect_err(entry)
                .to_string();
            assert!(err.contains(expect), "{entry}: {err}");
        }
        let bad_rft = EMBEDDED_DEFAULT.replace("group = 4", "group = 1");
        let err = Config::parse(&bad_rft, "t").expect_err("group").to_string();
        assert!(err.contains("rft.group"), "{err}");
    }

    #[test]
    fn refuses_a_key_shared_by_two_tenants() {
        let text = EMBEDDED_DEFAULT.replace("sk-globex-demo", "sk-acme-demo");
        assert!(matches!(
            Config::parse(&text, "t"),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
