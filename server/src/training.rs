//! Training jobs: feedback in, a new adapter version out, gated and hot-swapped.
//!
//! A job (API.md "Training") is started by `POST /v1/training/jobs` or by the automatic
//! trigger of the `[training]` policy. It runs as one tokio task:
//!
//! 1. waits for a slot (`max_concurrent_jobs` over all adapters; one job per adapter at a time,
//!    refused with 409 at submission);
//! 2. reads the adapter's training examples from the feedback store and holds out the prompts
//!    whose hash falls under `eval_fraction` (every example of a held-out prompt stays out of
//!    training, so a correction's demonstration cannot leak its pair's answer);
//! 3. tokenises the new (untrained) examples with the served model's chat template and hands
//!    them, with the current version's PEFT directory as the parent and reference policy, to
//!    the trainer plugin on the plugin's own thread, with progress and a cancel flag;
//! 4. loads the files the trainer wrote, measures the KL of the candidate to the base on the
//!    probe prompts, and applies the eval gate of DESIGN.md;
//! 5. publishes the version (compare-and-swap on the parent being current), activating it only
//!    when promoted, so requests switch to it at their next admission; a rejected candidate
//!    stays listed with its reason. The examples of a promoted version are marked trained.
//!
//! Job records are kept in memory and written to `<data_dir>/training/<id>.json` at every
//! change of state, so the list survives a restart (a job cut short by one is marked failed).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefix_rft_adapters::peft::PeftFiles;
use prefix_rft_adapters::store::{NewVersion, Source, Status};
use prefix_rft_adapters::AdapterError;
use prefix_rft_engine::chat_template::ChatMessage;
use prefix_rft_plugin_abi::host::{
    CallOptions, HostError, HostService, PluginHandle, ProgressSink,
};
use prefix_rft_trainer::job::{CompletionIds, JobData, PairIds};
use prefix_rft_trainer::train::TrainParams;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::backend::Backend;
use crate::config::{Config, RewardEntry, TrainingSection};
use crate::error::ApiError;
use crate::feedback::{ExampleKey, Prompt, TrainingExamples};
use crate::plugins::Plugins;
use crate::state::{AppState, Lifecycle};

/// `[training] trainer` value that selects the trainer compiled into the server.
pub const BUILTIN_TRAINER: &str = "builtin";

/// Probe questions of the KL measure when the config names none.
const DEFAULT_PROBES: [&str; 8] = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about autumn.",
    "How do I reverse a list in Python?",
    "Give me three tips for a job interview.",
    "What causes the seasons on Earth?",
    "Translate 'good morning' into Spanish.",
    "Summarise the plot of Romeo and Juliet.",
];

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for a training slot.
    Queued,
    /// Training, evaluating or publishing.
    Running,
    /// Finished: a version was published (promoted or rejected by the gate).
    Succeeded,
    /// Stopped by an error; `reason` says which.
    Failed,
    /// Cancelled by `DELETE` or by shutdown.
    Cancelled,
}

impl JobStatus {
    /// Every status, in the order of the metrics.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// True once the job can change no more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Who started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// `POST /v1/training/jobs`.
    Manual,
    /// The `[training]` policy.
    Auto,
}

/// What a job trained and evaluated on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataCounts {
    /// Preference pairs trained on.
    pub pairs: usize,
    /// Demonstrations trained on.
    pub demonstrations: usize,
    /// Unpaired thumbs-down trained on.
    pub unpaired: usize,
    /// Held-out pairs of the eval gate.
    pub held_out_pairs: usize,
}

impl DataCounts {
    /// Examples trained on.
    pub fn trained(&self) -> usize {
        self.pairs + self.demonstrations + self.unpaired
    }
}

/// A job's measurements.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobMetrics {
    /// Loss of every optimiser step so far.
    pub loss: Vec<f64>,
    /// Learning rate of every step so far.
    pub lr: Vec<f64>,
    /// What it trained and evaluated on.
    pub data: DataCounts,
    /// True when the eval pairs were held out (false: too few pairs, evaluated on training
    /// pairs).
    pub eval_held_out: Option<bool>,
    /// Eval before training (`logp_accuracy`, `logp_margin`, `reward_accuracy`, ...).
    pub eval_before: Option<Value>,
    /// Eval after training.
    pub eval_after: Option<Value>,
    /// Mean per-token KL(candidate ‖ base) on the probe prompts, nats.
    pub kl_to_base: Option<f64>,
    /// Seconds the trainer spent in optimiser steps.
    pub train_seconds: Option<f64>,
    /// Seconds the trainer spent computing reference log-probabilities before the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_seconds: Option<f64>,
    /// Preference pairs per second of training.
    pub pairs_per_s: Option<f64>,
    /// Mean reward of each step's RFT rollouts (adapters with a reward plugin).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rft_rewards: Vec<f64>,
}

/// One training job, as `GET /v1/training/jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `job-…`.
    pub id: String,
    /// Always `training.job`.
    pub object: String,
    /// The tenant whose adapter it trains.
    pub tenant: String,
    /// The adapter.
    pub adapter: String,
    /// Manual or automatic.
    pub trigger: Trigger,
    /// Where it is.
    pub status: JobStatus,
    /// Unix seconds of submission.
    pub created: u64,
    /// Unix seconds training started.
    pub started: Option<u64>,
    /// Unix seconds it ended.
    pub finished: Option<u64>,
    /// 0..1.
    pub progress: f64,
    /// Optimiser steps done.
    pub step: usize,
    /// Optimiser steps planned (0 until known).
    pub total_steps: usize,
    /// Hyper-parameters.
    pub params: TrainParams,
    /// The version it trained from (the reference policy).
    pub parent_version: Option<u32>,
    /// The version it published.
    pub version: Option<u32>,
    /// True when the version passed the gate and became current.
    pub promoted: bool,
    /// Why it failed, was cancelled, or was not promoted.
    pub reason: Option<String>,
    /// Measurements.
    pub metrics: JobMetrics,
}

/// Overrides a `POST /v1/training/jobs` body may carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Optimiser steps.
    pub steps: Option<usize>,
    /// Passes over the data.
    pub epochs: Option<usize>,
    /// Examples per step.
    pub batch_size: Option<usize>,
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// DPO/KTO β.
    pub beta: Option<f64>,
    /// SFT weight.
    pub sft_weight: Option<f64>,
    /// Seed.
    pub seed: Option<u64>,
}

impl Overrides {
    /// `base` with these overrides applied.
    pub fn apply(&self, base: &TrainParams) -> TrainParams {
        let mut p = base.clone();
        if self.steps.is_some() {
            p.steps = self.steps;
        }
        if let Some(v) = self.epochs {
            p.epochs = v;
        }
        if let Some(v) = self.batch_size {
            p.batch_size = v;
        }
        if let Some(v) = self.lr {
            p.lr = v;
        }
        if let Some(v) = self.beta {
            p.beta = v;
        }
        if let Some(v) = self.sft_weight {
            p.alpha = v;
        }
        if let Some(v) = self.seed {
            p.seed = v;
        }
        p
    }
}

/// One job and its cancel flag.
struct Entry {
    job: Mutex<Job>,
    cancel: Arc<AtomicBool>,
}

impl Entry {
    fn snapshot(&self) -> Job {
        lock(&self.job).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every job of the server, the trainer, and the policy.
pub struct Training {
    config: TrainingSection,
    dir: PathBuf,
    trainer: Result<PluginHandle, String>,
    slots: Arc<Semaphore>,
    jobs: Mutex<Vec<Arc<Entry>>>,
}

impl Training {
    /// The reward of `tenant`'s `adapter`, when `[[training.rewards]]` gives it one.
    fn reward_of(&self, tenant: &str, adapter: &str) -> Option<&RewardEntry> {
        self.config
            .rewards
            .iter()
            .find(|r| r.adapter.split_once('/') == Some((tenant, adapter)))
    }

    /// The trainer of `config` (built in, or the loaded `[[plugins]]` entry) and the job
    /// records found in `<data_dir>/training` (jobs a restart cut short are marked failed).
    pub fn new(config: &Config, plugins: &Plugins) -> Training {
        let t = &config.training;
        let trainer = if t.trainer == BUILTIN_TRAINER {
            PluginHandle::in_process(prefix_rft_trainer::TrainerPlugin)
                .map_err(|e| format!("the built-in trainer did not start: {e}"))
        } else {
            plugins.get(&t.trainer).cloned().ok_or_else(|| {
                format!(
                    "the trainer plugin `{}` is not loaded (see GET /v1/plugins)",
                    t.trainer
                )
            })
        };
        if let Err(e) = &trainer {
            tracing::error!(error = %e, "training is unavailable");
        }
        let dir = config.server.data_dir.join("training");
        let jobs = load_records(&dir, t.keep_jobs);
        Training {
            config: t.clone(),
            dir,
            trainer,
            slots: Arc::new(Semaphore::new(t.max_concurrent_jobs)),
            jobs: Mutex::new(jobs),
        }
    }

    /// Jobs of `tenant` (every tenant's for `None`), newest first.
    pub fn list(&self, tenant: Option<&str>) -> Vec<Job> {
        let jobs = lock(&self.jobs);
        jobs.iter()
            .rev()
            .map(|e| e.snapshot())
            .filter(|j| tenant.is_none_or(|t| j.tenant == t))
            .collect()
    }

    /// One job; another tenant's is `None`, as if it did not exist.
    pub fn get(&self, tenant: Option<&str>, id: &str) -> Option<Job> {
        self.entry(tenant, id).map(|e| e.snapshot())
    }

    fn entry(&self, tenant: Option<&str>, id: &str) -> Option<Arc<Entry>> {
        let jobs = lock(&self.jobs);
        jobs.iter()
            .find(|e| {
                let j = lock(&e.job);
                j.id == id && tenant.is_none_or(|t| j.tenant == t)
            })
            .cloned()
    }

    /// Asks a job to stop. A queued job is cancelled at once; a running one at the trainer's
    /// next step. A finished job is returned unchanged.
    pub fn cancel(&self, tenant: Option<&str>, id: &str) -> Option<Job> {
        let entry = self.entry(tenant, id)?;
        Some(self.cancel_entry(&entry))
    }

    fn cancel_entry(&self, entry: &Entry) -> Job {
        entry.cancel.store(true, Ordering::SeqCst);
        let mut job = lock(&entry.job);
        if job.status == JobStatus::Queued {
            self.cancel_queued(&mut job);
        }
        job.clone()
    }

    /// Ends a job that never started.
    fn cancel_queued(&self, job: &mut Job) {
        job.status = JobStatus::Cancelled;
        job.finished = Some(crate::unix_now());
        job.reason = Some("cancelled before it started".into());
        self.persist(job);
    }

    /// Cancels every queued and running job (shutdown).
    pub fn cancel_all(&self) {
        let entries: Vec<Arc<Entry>> = lock(&self.jobs).clone();
        for entry in &entries {
            self.cancel_entry(entry);
        }
    }

    fn active_for(&self, tenant: &str, adapter: &str) -> Option<String> {
        active_in(&lock(&self.jobs), tenant, adapter)
    }

    fn last_for(&self, tenant: &str, adapter: &str) -> Option<Job> {
        lock(&self.jobs).iter().rev().find_map(|e| {
            let j = lock(&e.job);
            (j.tenant == tenant && j.adapter == adapter).then(|| j.clone())
        })
    }

    /// Counts jobs by status (the `training_jobs` gauge).
    pub fn counts(&self) -> [(JobStatus, i64); 5] {
        let mut out = JobStatus::ALL.map(|s| (s, 0i64));
        for e in lock(&self.jobs).iter() {
            let s = lock(&e.job).status;
            if let Some(slot) = out.iter_mut().find(|(k, _)| *k == s) {
                slot.1 += 1;
            }
        }
        out
    }

    fn persist(&self, job: &Job) {
        if let Err(e) = write_record(&self.dir, job) {
            tracing::warn!(job = %job.id, error = %e, "could not write the job record");
        }
    }

    /// Drops the oldest finished jobs beyond `keep_jobs`, with their records.
    fn prune(&self) {
        let mut jobs = lock(&self.jobs);
        while jobs.len() > self.config.keep_jobs {
            let Some(pos) = jobs.iter().position(|e| lock(&e.job).status.is_terminal()) else {
                break;
            };
            let gone = jobs.remove(pos);
            let id = lock(&gone.job).id.clone();
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
        }
    }
}

/// The unfinished job of `tenant`'s `adapter` among `jobs`, if any.
fn active_in(jobs: &[Arc<Entry>], tenant: &str, adapter: &str) -> Option<String> {
    jobs.iter().find_map(|e| {
        let j = lock(&e.job);
        (j.tenant == tenant && j.adapter == adapter && !j.status.is_terminal())
            .then(|| j.id.clone())
    })
}

fn write_record(dir: &Path, job: &Job) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{}.json.tmp", job.id));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", job.id)))
}

fn load_records(dir: &Path, keep: usize) -> Vec<Arc<Entry>> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    // Trainer output directories and half-written records of a process that is gone.
    for e in read.filter_map(Result::ok) {
        if e.file_name().to_string_lossy().starts_with(".job-") {
            let path = e.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut jobs: Vec<Job> = read
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("job-") && name.ends_with(".json")
        })
        .filter_map(|e| {
            let bytes = std::fs::read(e.path()).ok()?;
            match serde_json::from_slice::<Job>(&bytes) {
                Ok(j) => Some(j),
                Err(err) => {
                    tracing::warn!(path = %e.path().display(), error = %err, "skipping an unreadable job record");
                    None
                }
            }
        })
        .collect();
    jobs.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    let skip = jobs.len().saturating_sub(keep);
    jobs.into_iter()
        .skip(skip)
        .map(|mut j| {
            if !j.status.is_terminal() {
                j.status = JobStatus::Failed;
                j.finished = Some(crate::unix_now());
                j.reason = Some("interrupted: the server stopped while the job ran".into());
                let _ = write_record(dir, &j);
            }
            Arc::new(Entry {
                job: Mutex::new(j),
                cancel: Arc::new(AtomicBool::new(false)),
            })
        })
        .collect()
}

/// Why a job could not be submitted.
fn submit_error(e: AdapterError, adapter: &str) -> ApiError {
    match e {
        AdapterError::NotFound(_) => ApiError::NotFound(format!("adapter `{adapter}` not found")),
        other => ApiError::from(other),
    }
}

/// Queues a job for `tenant`'s `adapter` and starts its task.
pub async fn submit(
    state: &Arc<AppState>,
    tenant: &str,
    adapter: &str,
    overrides: &Overrides,
    trigger: Trigger,
) -> Result<Job, ApiError> {
    let training = &state.training;
    if let Err(reason) = &training.trainer {
        return Err(ApiError::Unavailable(reason.clone()));
    }
    if state.feedback.is_none() {
        return Err(ApiError::Unavailable(
            "no feedback store is configured".into(),
        ));
    }
    let params = overrides.apply(&training.config.params);
    params
        .validate()
        .map_err(|e| ApiError::invalid_body(e.to_string()))?;
    let registry = Arc::clone(state.adapters()?);
    let (t, a) = (tenant.to_string(), adapter.to_string());
    crate::routes::inference::blocking(move || registry.store().current(&t, &a))
        .await?
        .map_err(|e| submit_error(e, adapter))?;
    let entry = {
        let mut jobs = lock(&training.jobs);
        if let Some(id) = active_in(&jobs, tenant, adapter) {
            return Err(ApiError::Conflict(format!(
                "adapter `{adapter}` already has an unfinished training job, {id}"
            )));
        }
        let job = Job {
            id: crate::random_id("job-"),
            object: "training.job".into(),
            tenant: tenant.to_string(),
            adapter: adapter.to_string(),
            trigger,
            status: JobStatus::Queued,
            created: crate::unix_now(),
            started: None,
            finished: None,
            progress: 0.0,
            step: 0,
            total_steps: 0,
            params,
            parent_version: None,
            version: None,
            promoted: false,
            reason: None,
            metrics: JobMetrics::default(),
        };
        training.persist(&job);
        let entry = Arc::new(Entry {
            job: Mutex::new(job),
            cancel: Arc::new(AtomicBool::new(false)),
        });
        jobs.push(Arc::clone(&entry));
        entry
    };
    let job = entry.snapshot();
    tracing::info!(job = %job.id, tenant, adapter, trigger = ?trigger, "training job queued");
    update_metrics(state);
    tokio::spawn(run(Arc::clone(state), entry));
    Ok(job)
}

fn update_metrics(state: &AppState) {
    for (status, n) in state.training.counts() {
        state
            .metrics
            .training_jobs
            .with_label_values(&[status.as_str()])
            .set(n);
    }
}

/// How a job ended when it did not publish.
enum Stop {
    Cancelled(String),
    Failed(String),
}

/// Any of these errors fails the job with its message. (Named one by one: a blanket impl over
/// `Display` collides with crates that may implement `From` for projected types.)
macro_rules! fails_the_job {
    ($($e:ty),* $(,)?) => {$(
        impl From<$e> for Stop {
            fn from(e: $e) -> Self {
                Stop::Failed(e.to_string())
            }
        }
    )*};
}
fails_the_job!(
    prefix_rft_adapters::AdapterError,
    crate::feedback::FeedbackError,
    crate::error::ApiError,
    crate::backend::PromptError,
    std::io::Error,
);

/// What a job published.
struct Published {
    version: u32,
    promoted: bool,
    reason: Option<String>,
}

async fn run(state: Arc<AppState>, entry: Arc<Entry>) {
    let training = &state.training;
    let permit = tokio::select! {
        p = Arc::clone(&training.slots).acquire_owned() => p.ok(),
        _ = async {
            while !entry.cancel.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } => None,
    };
    {
        let mut job = lock(&entry.job);
        if permit.is_none() || job.status.is_terminal() {
            if !job.status.is_terminal() {
                training.cancel_queued(&mut job);
            }
            drop(job);
            update_metrics(&state);
            return;
        }
        job.status = JobStatus::Running;
        job.started = Some(crate::unix_now());
        training.persist(&job);
    }
    update_metrics(&state);
    let started = Instant::now();
    let outcome = execute(&state, &entry).await;
    {
        let mut job = lock(&entry.job);
        job.finished = Some(crate::unix_now());
        match outcome {
            Ok(p) => {
                job.status = JobStatus::Succeeded;
                job.version = Some(p.version);
                job.promoted = p.promoted;
                job.reason = p.reason;
                job.progress = 1.0;
            }
            Err(Stop::Cancelled(reason)) => {
                job.status = JobStatus::Cancelled;
                job.reason = Some(reason);
            }
            Err(Stop::Failed(reason)) => {
                job.status = JobStatus::Failed;
                job.reason = Some(reason);
            }
        }
        tracing::info!(
            job = %job.id,
            tenant = %job.tenant,
            adapter = %job.adapter,
            status = job.status.as_str(),
            version = ?job.version,
            promoted = job.promoted,
            reason = job.reason.as_deref().unwrap_or(""),
            secs = started.elapsed().as_secs_f64(),
            "training job finished"
        );
        training.persist(&job);
    }
    drop(permit);
    let _ = std::fs::remove_dir_all(out_dir(&training.dir, &entry.snapshot().id));
    training.prune();
    update_metrics(&state);
}

/// The process's resident set, from `/proc/self/status` (`None` where there is none).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// Watches the server's resident memory while a job trains. Once it has grown more than the
/// budget over what it was when the job started, the guard remembers by how much and raises
/// the job's cancel flag: the trainer stops before its next step and the job fails alone.
/// Nothing is watched with a budget of 0 or where the RSS cannot be read.
struct MemoryGuard {
    grown: Arc<std::sync::atomic::AtomicU64>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemoryGuard {
    /// How often the RSS is sampled.
    const PERIOD: Duration = Duration::from_millis(50);

    fn start(budget: u64, cancel: Arc<AtomicBool>) -> MemoryGuard {
        let grown = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let base = resident_bytes().filter(|_| budget > 0);
        let thread = base.and_then(|base| {
            let (grown, done) = (Arc::clone(&grown), Arc::clone(&done));
            std::thread::Builder::new()
                .name("training-memory".into())
                .spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        let now = resident_bytes().unwrap_or(base);
                        if now.saturating_sub(base) > budget {
                            grown.store(now - base, Ordering::SeqCst);
                            cancel.store(true, Ordering::SeqCst);
                            return;
                        }
                        std::thread::sleep(Self::PERIOD);
                    }
                })
                .ok()
        });
        MemoryGuard {
            grown,
            done,
            thread,
        }
    }

    /// Stops watching; by how many bytes the RSS had grown if the budget was exceeded.
    fn finish(mut self) -> Option<u64> {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Some(self.grown.load(Ordering::SeqCst)).filter(|&g| g > 0)
    }
}

impl Drop for MemoryGuard {
    /// A job dropped mid-call (shutdown) ends the watch too.
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

fn out_dir(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!(".{id}.out"))
}

/// The examples of one job: what trains, what evaluates, and the keys to mark.
struct Split {
    data: JobData,
    trained_keys: Vec<ExampleKey>,
}

impl Split {
    fn counts(&self) -> DataCounts {
        DataCounts {
            pairs: self.data.pairs.len(),
            demonstrations: self.data.demonstrations.len(),
            unpaired: self.data.negatives.len(),
            held_out_pairs: self.data.eval_pairs.len(),
        }
    }
}

/// True when `prompt` is in the held-out share (a stable hash, the same on every machine).
fn held_out(prompt: &Prompt, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let digest = Sha256::digest(prompt.key().as_bytes());
    let h = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    ((h % 10_000) as f64) < fraction * 10_000.0
}

/// Counts the new, trainable examples (the automatic trigger's measure).
fn new_examples(ex: &TrainingExamples, fraction: f64) -> usize {
    let p = ex
        .pairs
        .iter()
        .filter(|p| is_new(&p.trained_in, &p.prompt, fraction));
    let d = ex
        .demonstrations
        .iter()
        .filter(|d| is_new(&d.trained_in, &d.prompt, fraction));
    let n = ex
        .unpaired_negatives
        .iter()
        .filter(|n| is_new(&n.trained_in, &n.prompt, fraction));
    p.count() + d.count() + n.count()
}

/// An example a job trains on: no promoted version used it and its prompt is not held out.
fn is_new(trained_in: &[u32], prompt: &Prompt, fraction: f64) -> bool {
    trained_in.is_empty() && !held_out(prompt, fraction)
}

/// Tokenises the new examples for training and the held-out pairs for the gate.
fn split(
    backend: &dyn Backend,
    ex: &TrainingExamples,
    fraction: f64,
) -> Result<Split, crate::backend::PromptError> {
    let prompt_ids = |p: &Prompt| -> Result<Vec<u32>, crate::backend::PromptError> {
        match p {
            Prompt::Chat(messages) => {
                let messages: Vec<ChatMessage> = messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect();
                backend.encode(&backend.render_chat(&messages)?)
            }
            Prompt::Text(t) => backend.encode(t),
            Prompt::Tokens(ids) => Ok(ids.clone()),
        }
    };
    let mut out = Split {
        data: JobData::default(),
        trained_keys: Vec::new(),
    };
    for p in &ex.pairs {
        let held = held_out(&p.prompt, fraction);
        if !held && !p.trained_in.is_empty() {
            continue;
        }
        let ids = PairIds {
            prompt: prompt_ids(&p.prompt)?,
            chosen: backend.encode_answer(&p.chosen)?,
            rejected: backend.encode_answer(&p.rejected)?,
        };
        if held {
            out.data.eval_pairs.push(ids);
        } else {
            out.data.pairs.push(ids);
            out.trained_keys.push(p.key.clone());
        }
    }
    for d in &ex.demonstrations {
        if is_new(&d.trained_in, &d.prompt, fraction) {
            out.data.demonstrations.push(CompletionIds {
                prompt: prompt_ids(&d.prompt)?,
                completion: backend.encode_answer(&d.completion)?,
            });
            out.trained_keys.push(d.key.clone());
        }
    }
    for n in &ex.unpaired_negatives {
        if is_new(&n.trained_in, &n.prompt, fraction) {
            out.data.negatives.push(CompletionIds {
                prompt: prompt_ids(&n.prompt)?,
                completion: backend.encode_answer(&n.completion)?,
            });
            out.trained_keys.push(n.key.clone());
        }
    }
    Ok(out)
}

/// The gate of DESIGN.md: on the eval pairs the share preferring the chosen answer must not
/// drop and the mean log-prob margin must rise; the KL to the base must stay under `max_kl`.
/// Returns why a candidate is rejected.
fn gate(before: Option<&Value>, after: Option<&Value>, kl: f64, max_kl: f64) -> Option<String> {
    if !(kl.is_finite() && kl <= max_kl) {
        return Some(format!(
            "KL to the base on the probe prompts is {kl:.4} nats/token, over the bound {max_kl}"
        ));
    }
    let field = |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_f64);
    let pairs = field(after, "pairs").unwrap_or(0.0);
    if pairs == 0.0 {
        return None;
    }
    let (Some(acc0), Some(acc1), Some(m0), Some(m1)) = (
        field(before, "logp_accuracy"),
        field(after, "logp_accuracy"),
        field(before, "logp_margin"),
        field(after, "logp_margin"),
    ) else {
        return Some("the trainer reported no eval metrics for the eval pairs".into());
    };
    if acc1 < acc0 {
        return Some(format!(
            "preference accuracy on the eval pairs dropped from {acc0:.3} to {acc1:.3}"
        ));
    }
    if m1 <= m0 {
        return Some(format!(
            "the mean log-prob margin on the eval pairs did not rise ({m0:.4} to {m1:.4})"
        ));
    }
    None
}

/// The host's `reward` service of a job on a rewarded adapter: decodes the trainer's token
/// ids (a rollout's final stop token dropped), asks the reward plugin with the adapter's
/// config, and checks its answer (one finite score in `[0, 1]` per completion) so a garbage
/// or hung plugin fails the job with the plugin's name and what it did.
fn reward_service(
    backend: Arc<dyn Backend>,
    plugin: PluginHandle,
    entry: RewardEntry,
) -> HostService {
    let stop = backend.info().stop_tokens.clone();
    Arc::new(move |service, request| {
        if service != "reward" {
            return Err(format!("the server offers no `{service}` service"));
        }
        let ids = |v: &Value| -> Result<Vec<u32>, String> {
            serde_json::from_value(v.clone()).map_err(|e| format!("bad token ids: {e}"))
        };
        let decode = |mut t: Vec<u32>| -> Result<String, String> {
            if t.last().is_some_and(|x| stop.contains(x)) {
                t.pop();
            }
            backend.decode(&t).map_err(|e| e.to_string())
        };
        let prompt = decode(ids(&request["prompt"])?)?;
        let completions = request["completions"]
            .as_array()
            .ok_or("`completions` must be a list")?
            .iter()
            .map(|c| decode(ids(c)?))
            .collect::<Result<Vec<String>, String>>()?;
        let mut call = json!({"prompt": prompt, "completions": completions});
        if !entry.config.is_null() {
            call["config"] = entry.config.clone();
        }
        let name = &entry.plugin;
        let reply = plugin
            .run(&call, CallOptions::default())
            .map_err(|e| format!("the reward plugin `{name}` failed: {e}"))?;
        let scores = reply
            .get("scores")
            .and_then(Value::as_array)
            .and_then(|s| s.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .filter(|s| s.len() == completions.len() && s.iter().all(|x| (0.0..=1.0).contains(x)))
            .ok_or_else(|| {
                let mut shown = reply.to_string();
                shown.truncate(200);
                format!(
                    "the reward plugin `{name}` returned {shown}; expected `scores`: {} numbers in [0, 1]",
                    completions.len()
                )
            })?;
        Ok(json!({ "scores": scores }))
    })
}

async fn execute(state: &Arc<AppState>, entry: &Arc<Entry>) -> Result<Published, Stop> {
    let training = &state.training;
    let trainer = training.trainer.clone().map_err(Stop::Failed)?;
    let (id, tenant, adapter, params) = {
        let j = lock(&entry.job);
        (
            j.id.clone(),
            j.tenant.clone(),
            j.adapter.clone(),
            j.params.clone(),
        )
    };
    let backend = state.backend().map_err(|e| Stop::Failed(e.to_string()))?;
    let registry = Arc::clone(state.adapters().map_err(|e| Stop::Failed(e.to_string()))?);
    let feedback = state
        .feedback
        .clone()
        .ok_or_else(|| Stop::Failed("no feedback store is configured".into()))?;

    // The parent: the current version, the reference policy and the compare-and-swap target.
    let (t, a, r) = (tenant.clone(), adapter.clone(), Arc::clone(&registry));
    let (parent, parent_dir) = crate::routes::inference::blocking(move || {
        let v = r.store().current(&t, &a)?;
        Ok::<_, AdapterError>((v, r.store().version_dir(&t, &a, v)?))
    })
    .await??;
    lock(&entry.job).parent_version = Some(parent);

    let examples = feedback.training_examples(&tenant, &adapter).await?;
    let fraction = training.config.eval_fraction;
    let b = Arc::clone(&backend);
    let split = crate::routes::inference::blocking(move || split(b.as_ref(), &examples, fraction))
        .await??;
    let counts = split.counts();
    if counts.trained() == 0 {
        return Err(Stop::Failed(format!(
            "no new feedback to train on for adapter `{adapter}` (every example is trained \
             on or held out)"
        )));
    }
    lock(&entry.job).metrics.data = counts.clone();

    let out = out_dir(&training.dir, &id);
    let _ = std::fs::remove_dir_all(&out);
    let mut request = json!({
        "base_model": state.config.model.path,
        "base_model_name": state.config.model.id,
        "parent": parent_dir,
        "params": params,
        "data": split.data,
        "out_dir": out,
    });
    let reward = match training.reward_of(&tenant, &adapter) {
        Some(entry) => {
            let handle = state.plugins.get(&entry.plugin).cloned().ok_or_else(|| {
                Stop::Failed(format!(
                    "the reward plugin `{}` is not loaded (see GET /v1/plugins)",
                    entry.plugin
                ))
            })?;
            if !entry.config.is_null() {
                let (h, c) = (handle.clone(), entry.config.clone());
                crate::routes::inference::blocking(move || h.validate_config(&c))
                    .await?
                    .map_err(|e| {
                        Stop::Failed(format!(
                            "the reward config of `{}` is refused by `{}`: {e}",
                            entry.adapter, entry.plugin
                        ))
                    })?;
            }
            let mut rft = training.config.rft.clone();
            rft.stop_tokens.extend(&backend.info().stop_tokens);
            request["rft"] = serde_json::to_value(&rft).unwrap_or(Value::Null);
            Some(reward_service(Arc::clone(&backend), handle, entry.clone()))
        }
        None => None,
    };
    let sink_entry = Arc::clone(entry);
    let sink_metrics = state.metrics.clone();
    let progress: ProgressSink = Arc::new(move |p| {
        let mut job = lock(&sink_entry.job);
        job.progress = p.fraction.clamp(0.0, 1.0);
        let get = |k: &str| p.detail.get(k).and_then(Value::as_f64);
        if let Some(step) = get("step") {
            job.step = step as usize;
        }
        if let Some(total) = get("total") {
            job.total_steps = total as usize;
        }
        if let Some(loss) = get("loss") {
            job.metrics.loss.push(loss);
            sink_metrics.training_last_loss.set(loss);
        }
        if let Some(lr) = get("lr") {
            job.metrics.lr.push(lr);
        }
    });
    let job_limit = Some(training.config.max_job_secs)
        .filter(|&s| s > 0)
        .map(Duration::from_secs);
    let plugin_timeout = trainer.timeout();
    let timeout = job_limit.map_or(plugin_timeout, |l| l.min(plugin_timeout));
    let options = CallOptions {
        timeout: Some(timeout),
        cancel: Some(Arc::clone(&entry.cancel)),
        progress: Some(progress),
        host: reward,
    };
    let guard = MemoryGuard::start(
        training.config.max_memory_mib.saturating_mul(1 << 20),
        Arc::clone(&entry.cancel),
    );
    let reply = crate::routes::inference::blocking(move || trainer.run(&request, options)).await;
    if let Some(grown) = guard.finish() {
        return Err(Stop::Failed(format!(
            "stopped: the server's memory grew by {} MiB while the job trained, over \
             training.max_memory_mib = {}",
            grown >> 20,
            training.config.max_memory_mib
        )));
    }
    let reply = reply?;
    // A timeout raises the cancel flag too: it is a failure, not a cancellation.
    if let Err(HostError::Timeout { .. }) = &reply {
        return Err(Stop::Failed(format!(
            "stopped: the job trained for longer than {} s (training.max_job_secs = {}, the \
             trainer's timeout_secs = {})",
            timeout.as_secs_f64(),
            training.config.max_job_secs,
            plugin_timeout.as_secs_f64()
        )));
    }
    if entry.cancel.load(Ordering::SeqCst) {
        return Err(Stop::Cancelled("cancelled while training".into()));
    }
    let reply = reply.map_err(|e| Stop::Failed(format!("the trainer failed: {e}")))?;
    {
        let mut job = lock(&entry.job);
        let m = reply.get("metrics");
        let get = |k: &str| m.and_then(|m| m.get(k)).filter(|v| !v.is_null()).cloned();
        job.metrics.eval_before = get("eval_before");
        job.metrics.eval_after = get("eval_after");
        job.metrics.eval_held_out = get("eval_held_out").and_then(|v| v.as_bool());
        job.metrics.train_seconds = get("train_seconds").and_then(|v| v.as_f64());
        job.metrics.reference_seconds = get("reference_seconds").and_then(|v| v.as_f64());
        job.metrics.pairs_per_s = get("pairs_per_s").and_then(|v| v.as_f64());
        if let Some(losses) = get("losses").and_then(|v| serde_json::from_value(v).ok()) {
            job.metrics.loss = losses;
        }
        if let Some(r) = get("rft_rewards").and_then(|v| serde_json::from_value(v).ok()) {
            job.metrics.rft_rewards = r;
        }
    }

    // The candidate: the trainer's files, checked like an upload.
    let files = PeftFiles {
        config: std::fs::read(out.join(prefix_rft_adapters::peft::CONFIG_FILE))?,
        weights: std::fs::read(out.join(prefix_rft_adapters::peft::WEIGHTS_FILE))?,
    };
    let (r, f) = (Arc::clone(&registry), files.clone());
    let candidate = crate::routes::inference::blocking(move || r.validate(&f))
        .await?
        .map_err(|e| Stop::Failed(format!("the trainer wrote an unusable adapter: {e}")))?;
    let probes = probe_prompts(&training.config);
    let kind = candidate.kind();
    let b = Arc::clone(&backend);
    let kl = crate::routes::inference::blocking(move || {
        let ids = probes
            .iter()
            .map(|p| {
                b.encode(&b.render_chat(&[ChatMessage {
                    role: "user".into(),
                    content: p.clone(),
                }])?)
            })
            .collect::<Result<Vec<_>, _>>()?;
        b.kl_to_base(&ids, &candidate.weights)
    })
    .await??;
    let (before, after) = {
        let mut job = lock(&entry.job);
        job.metrics.kl_to_base = Some(kl);
        (
            job.metrics.eval_before.clone(),
            job.metrics.eval_after.clone(),
        )
    };
    if entry.cancel.load(Ordering::SeqCst) {
        return Err(Stop::Cancelled("cancelled before publishing".into()));
    }
    let rejection = gate(before.as_ref(), after.as_ref(), kl, training.config.max_kl);
    let promoted = rejection.is_none();
    let metrics = serde_json::to_value(&lock(&entry.job).metrics).unwrap_or(Value::Null);
    let new = NewVersion {
        parent: Some(parent),
        source: Source::Training,
        status: if promoted {
            Status::Live
        } else {
            Status::Rejected
        },
        kind,
        job_id: Some(id.clone()),
        data: serde_json::to_value(&counts).ok(),
        metrics: Some(metrics),
        reason: rejection.clone(),
    };
    let (t, a, r) = (tenant.clone(), adapter.clone(), Arc::clone(&registry));
    let published = crate::routes::inference::blocking(move || {
        match r.publish(&t, &a, &files, new.clone(), promoted, Some(parent)) {
            Err(AdapterError::Conflict { current, .. }) => {
                // Someone swapped the adapter while it trained: keep the version, unpromoted.
                let reason = format!(
                    "version {current} became current while training from version {parent}; \
                     this version was kept without activating it"
                );
                let new = NewVersion {
                    status: Status::Rejected,
                    reason: Some(reason.clone()),
                    ..new
                };
                r.publish(&t, &a, &files, new, false, None)
                    .map(|m| (m, false, Some(reason)))
            }
            other => other.map(|m| (m, promoted, rejection)),
        }
    })
    .await??;
    let (manifest, promoted, reason) = published;
    if promoted {
        crate::routes::adapters::prepare(state, &tenant, &adapter, manifest.version).await;
        let marked = feedback
            .mark_trained(&tenant, &adapter, split.trained_keys, manifest.version)
            .await?;
        tracing::info!(job = %id, version = manifest.version, marked, "promoted; examples marked trained");
    }
    Ok(Published {
        version: manifest.version,
        promoted,
        reason,
    })
}

/// The automatic trigger: every `poll_interval_secs`, for each tenant's adapters, starts a job
/// when the policy allows. Runs until the server drains.
pub async fn trigger_loop(state: Arc<AppState>) {
    let cfg = state.training.config.clone();
    if !cfg.auto || state.training.trainer.is_err() || state.feedback.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(cfg.poll_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match state.lifecycle() {
            Lifecycle::Ready => {}
            Lifecycle::Loading => continue,
            Lifecycle::Draining | Lifecycle::Failed => return,
        }
        for tenant in state.config.tenants.iter().map(|t| t.id.clone()) {
            if let Err(e) = trigger_tenant(&state, &tenant).await {
                tracing::warn!(tenant, error = %e, "automatic training check failed");
            }
        }
    }
}

async fn trigger_tenant(state: &Arc<AppState>, tenant: &str) -> Result<(), String> {
    let cfg = &state.training.config;
    let registry = Arc::clone(state.adapters().map_err(|e| e.to_string())?);
    let t = tenant.to_string();
    let names = crate::routes::inference::blocking(move || registry.store().names(&t))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let Some(feedback) = state.feedback.clone() else {
        return Ok(());
    };
    let now = crate::unix_now();
    for name in names {
        if state.training.active_for(tenant, &name).is_some() {
            continue;
        }
        let last = state.training.last_for(tenant, &name);
        if last
            .as_ref()
            .is_some_and(|j| now.saturating_sub(j.created) < cfg.cooldown_secs)
        {
            continue;
        }
        let stats = feedback
            .stats(tenant, &name)
            .await
            .map_err(|e| e.to_string())?;
        if (stats.untrained as usize) < cfg.min_new_examples {
            continue;
        }
        let examples = feedback
            .training_examples(tenant, &name)
            .await
            .map_err(|e| e.to_string())?;
        let fresh = new_examples(&examples, cfg.eval_fraction);
        // After a job that did not promote, wait for more data than it saw.
        let seen = last
            .filter(|j| !j.promoted)
            .map_or(0, |j| j.metrics.data.trained());
        if fresh < cfg.min_new_examples || (seen > 0 && fresh <= seen) {
            continue;
        }
        match submit(state, tenant, &name, &Overrides::default(), Trigger::Auto).await {
            Ok(job) => {
                tracing::info!(job = %job.id, tenant, adapter = %name, fresh, "automatic training job")
            }
            Err(e) => {
                tracing::warn!(tenant, adapter = %name, error = %e, "automatic training job not started")
            }
        }
    }
    Ok(())
}

/// The user messages the gate's KL is measured on.
pub fn probe_prompts(cfg: &TrainingSection) -> Vec<String> {
    if cfg.probe_prompts.is_empty() {
        DEFAULT_PROBES.iter().map(|s| s.to_string()).collect()
    } else {
        cfg.probe_prompts.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_gate_wants_accuracy_kept_margin_up_and_kl_bounded() {
        let before = json!({"pairs": 4, "logp_accuracy": 0.5, "logp_margin": -1.0});
        let better = json!({"pairs": 4, "logp_accuracy": 0.75, "logp_margin": 0.5});
        let worse_acc = json!({"pairs": 4, "logp_accuracy": 0.25, "logp_margin": 0.5});
        let same_margin = json!({"pairs": 4, "logp_accuracy": 0.5, "logp_margin": -1.0});
        assert_eq!(gate(Some(&before), Some(&better), 0.1, 1.0), None);
        assert!(gate(Some(&before), Some(&worse_acc), 0.1, 1.0)
            .unwrap()
            .contains("accuracy"));
        assert!(gate(Some(&before), Some(&same_margin), 0.1, 1.0)
            .unwrap()
            .contains("margin"));
        assert!(gate(Some(&before), Some(&better), 2.0, 1.0)
            .unwrap()
            .contains("KL"));
        assert!(gate(Some(&before), Some(&better), f64::NAN, 1.0).is_some());
        // No eval pairs (only demonstrations): only the KL bound applies.
        assert_eq!(gate(None, Some(&json!({"pairs": 0})), 0.1, 1.0), None);
        assert_eq!(gate(None, None, 0.1, 1.0), None);
    }

    #[test]
    fn held_out_prompts_are_a_stable_share() {
        let prompts: Vec<Prompt> = (0..2000)
            .map(|i| Prompt::Text(format!("question {i}")))
            .collect();
        let held = prompts.iter().filter(|p| held_out(p, 0.15)).count();
        assert!((200..400).contains(&held), "{held}");
        assert!(prompts
            .iter()
            .all(|p| held_out(p, 0.15) == held_out(p, 0.15)));
        assert!(!prompts.iter().any(|p| held_out(p, 0.0)));
        // Whitespace does not change the prompt's identity.
        let a = Prompt::Text("same  question".into());
        let b = Prompt::Text(" same question ".into());
        assert_eq!(held_out(&a, 0.5), held_out(&b, 0.5));
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let base = TrainParams::default();
        let o = Overrides {
            steps: Some(7),
            beta: Some(0.3),
            ..Overrides::default()
        };
        let p = o.apply(&base);
        assert_eq!(p.steps, Some(7));
        assert_eq!(p.beta, 0.3);
        assert_eq!(p.lr, base.lr);
        assert_eq!(Overrides::default().apply(&base), base);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_memory_guard_cancels_past_its_budget_and_only_then() {
        let cancel = Arc::new(AtomicBool::new(false));
        let quiet = MemoryGuard::start(1 << 40, Arc::clone(&cancel));
        std::thread::sleep(MemoryGuard::PERIOD * 3);
        assert_eq!(quiet.finish(), None);
        assert!(!cancel.load(Ordering::SeqCst));

        let guard = MemoryGuard::start(16 << 20, Arc::clone(&cancel));
        let big = vec![1u8; 128 << 20];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cancel.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(MemoryGuard::PERIOD);
        }
        assert!(
            cancel.load(Ordering::SeqCst),
            "128 MiB more did not trip a 16 MiB budget"
        );
        let grown = guard.finish().expect("the guard reports the growth");
        assert!(grown > 16 << 20, "{grown}");
        assert_eq!(big[big.len() - 1], 1);
    }

    #[test]
    fn records_round_trip_and_unfinished_ones_are_marked_failed() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = Job {
            id: "job-a".into(),
            object: "training.job".into(),
            tenant: "acme".into(),
            adapter: "support".into(),
            trigger: Trigger::Auto,
            status: JobStatus::Running,
            created: 10,
            started: Some(11),
            finished: None,
            progress: 0.5,
            step: 2,
            total_steps: 4,
            params: TrainParams::default(),
            parent_version: Some(1),
            version: None,
            promoted: false,
            reason: None,
            metrics: JobMetrics::default(),
        };
        write_record(dir.path(), &job).unwrap();
        job.id = "job-b".into();
        job.created = 12;
        job.status = JobStatus::Succeeded;
        write_record(dir.path(), &job).unwrap();
        std::fs::write(dir.path().join("job-c.json"), b"{not json").unwrap();
        std::fs::create_dir(dir.path().join(".job-a.out")).unwrap();
        let loaded: Vec<Job> = load_records(dir.path(), 10)
            .iter()
            .map(|e| e.snapshot())
            .collect();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].id, "job-a");
        assert_eq!(loaded[0].status, JobStatus::Failed);
        assert!(loaded[0].reason.as_deref().unwrap().contains("interrupted"));
        assert_eq!(loaded[1].status, JobStatus::Succeeded);
        assert!(!dir.path().join(".job-a.out").exists(), "stale output kept");
        // keep_jobs keeps the newest.
        let kept = load_records(dir.path(), 1);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].snapshot().id, "job-b");
    }
}
