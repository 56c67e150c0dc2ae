//! The prefix-rft server library: configuration, the OpenAI-compatible HTTP surface, tenants,
//! the engine backend with its continuous-batching scheduler, metrics and completion records.
//! The binary only parses arguments; tests get the same [`router`] and [`run`].

pub mod auth;
pub mod backend;
pub mod config;
pub mod error;
pub mod feedback;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod plugins;
pub mod quota;
pub mod recorder;
pub mod routes;
pub mod state;
pub mod training;
pub mod validation;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prefix_rft_adapters::{AdapterRegistry, AdapterStore, Limits, RegistryConfig};
use prefix_rft_engine::model::LoadOptions;
use prefix_rft_engine::LoadedModel;

pub use routes::router;
pub use state::{AppState, Lifecycle};

use backend::local::LocalBackend;
use backend::Backend;
use config::ModelBackend;

/// How often a drain checks whether running requests are done.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How long connections may stay open once the drain is over.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `prefix` followed by 24 random alphanumeric characters (completion, feedback and job ids).
pub fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let tail: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

/// Why the model could not be served.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] prefix_rft_engine::EngineError),
    #[error("starting the scheduler thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("adapter store: {0}")]
    Adapters(#[from] prefix_rft_adapters::AdapterError),
    #[error("{0}")]
    Backend(String),
}

/// Opens the adapter store of `cfg` (recovering from an interrupted publish) and its live
/// registry for a base model of shape `model`; `lora_f32`: the model applies LoRA in f32 (see
/// [`RegistryConfig::lora_f32`]).
pub fn open_adapters(
    cfg: &config::Config,
    model: prefix_rft_engine::model::ModelConfig,
    lora_f32: bool,
) -> Result<AdapterRegistry, StartError> {
    let a = &cfg.adapters;
    let store = AdapterStore::open(cfg.adapters_dir())?;
    let registry = AdapterRegistry::new(
        store,
        model,
        RegistryConfig {
            base_id: cfg.model.id.clone(),
            limits: Limits {
                max_rank: a.max_rank,
                max_file_bytes: a.max_file_bytes,
                max_virtual_tokens: a.max_virtual_tokens,
            },
            resident_budget_bytes: a.resident_budget_mib << 20,
            retain_versions: a.retain_versions,
            lora_f32,
        },
    );
    for p in &a.pinned {
        if let Some((tenant, name)) = p.split_once('/') {
            registry.set_pinned(tenant, name, true);
        }
    }
    Ok(registry)
}

/// Loads the model at `path` (blocking) and installs it as `state`'s backend.
pub fn load_backend(state: &AppState, path: &Path) -> Result<(), StartError> {
    let cfg = &state.config;
    if cfg.model.threads > 0 {
        prefix_rft_engine::quant::set_num_threads(cfg.model.threads);
    }
    let t0 = Instant::now();
    let model = LoadedModel::load(
        path,
        LoadOptions {
            dequantize: cfg.model.dequantize,
            activations: cfg.model.activations,
        },
    )?;
    let lora_f32 = !prefix_rft_engine::model::uses_ggml_arithmetic(model.model.weights());
    let registry = open_adapters(cfg, model.model.config().clone(), lora_f32)?;
    state.set_adapters(Arc::new(registry));
    let local = LocalBackend::start(
        model,
        cfg.model.id.clone(),
        &cfg.limits,
        state.metrics.scheduler.clone(),
    )?;
    let backend: Arc<dyn Backend> = match cfg.model.backend {
        ModelBackend::Engine => Arc::new(local),
        #[cfg(feature = "mistralrs")]
        ModelBackend::Mistralrs => {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                StartError::Backend("the mistralrs backend starts inside a tokio runtime".into())
            })?;
            Arc::new(
                backend::mistralrs::MistralrsBackend::start(
                    local,
                    path,
                    &cfg.limits,
                    backend::mistralrs::AdapterOptions {
                        max_live: cfg.model.mistralrs_max_live,
                        merge_dir: cfg.server.data_dir.join("mistralrs-merged"),
                        live: state.metrics.mistralrs_versions_live.clone(),
                    },
                    runtime,
                )
                .map_err(|e| StartError::Backend(e.to_string()))?,
            )
        }
        #[cfg(not(feature = "mistralrs"))]
        ModelBackend::Mistralrs => {
            return Err(StartError::Backend(
                "[model] backend = \"mistralrs\" needs a build with the cargo feature \
                 `mistralrs` (cargo build --release --features mistralrs)"
                    .into(),
            ))
        }
    };
    tracing::info!(path = %path.display(), backend = ?cfg.model.backend,
        secs = t0.elapsed().as_secs_f64(), "model loaded");
    state.set_backend(backend);
    Ok(())
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains: `/ready` and new
/// requests answer 503 while running requests finish, for at most `drain_timeout_secs`; then
/// the listener closes and the function returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let drain_timeout = Duration::from_secs(state.config.server.drain_timeout_secs);
    let drain_state = Arc::clone(&state);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut closing = stop_tx.subscribe();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining");
        drain_state.start_draining();
        drain_state.training.cancel_all();
        let deadline = Instant::now() + drain_timeout;
        while Instant::now() < deadline {
            if drain_state.loaded_backend().is_none_or(|b| b.idle()) {
                break;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        let _ = stop_tx.send(true);
    });
    tokio::spawn(training::trigger_loop(Arc::clone(&state)));
    let app = router(state);
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    // Graceful shutdown waits for open connections; a stuck client must not hold the process.
    tokio::select! {
        r = serve => r,
        _ = async move {
            let _ = closing.wait_for(|stop| *stop).await;
            tokio::time::sleep(CLOSE_GRACE).await;
        } => {
            tracing::warn!("connections still open after the drain; closing");
            Ok(())
        }
    }
}
