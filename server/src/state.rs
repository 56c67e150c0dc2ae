//! What every handler shares: configuration, keys, the backend once loaded, the lifecycle,
//! metrics and the completion recorder.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use prefix_rft_adapters::{AdapterError, AdapterRegistry, Lease};

use crate::auth::{KeyTable, Principal};
use crate::backend::Backend;
use crate::config::Config;
use crate::error::ApiError;
use crate::feedback::FeedbackStore;
use crate::metrics::Metrics;
use crate::plugins::Plugins;
use crate::quota::TenantQuotas;
use crate::recorder::{CompletionRecorder, InMemoryRecorder};
use crate::training::Training;

/// Records kept by the in-memory recorder.
const IN_MEMORY_RECORDS: usize = 10_000;

/// Where the server is in its life; `/ready` is 200 only in `Ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Lifecycle {
    /// The model is being loaded.
    Loading = 0,
    /// Serving.
    Ready = 1,
    /// Shutting down: new requests get 503, running ones finish.
    Draining = 2,
    /// Loading failed.
    Failed = 3,
}

/// What a `model` field resolved to.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The id as the client sent it (echoed in responses).
    pub requested: String,
    /// `base` or `<adapter>@<N>`: the `x-adapter-version` header and `system_fingerprint`.
    pub version_label: String,
    /// The adapter version the request runs with, held until the request ends.
    pub adapter: Option<Lease>,
}

impl ResolvedModel {
    /// Context positions the adapter's prefix takes.
    pub fn prefix_len(&self) -> usize {
        self.adapter
            .as_ref()
            .and_then(|l| l.weights().prefix())
            .map_or(0, |p| p.num_virtual_tokens)
    }
}

/// Shared server state.
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// API keys.
    pub keys: Arc<KeyTable>,
    /// Metrics.
    pub metrics: Metrics,
    /// Where completions are recorded.
    pub recorder: Arc<dyn CompletionRecorder>,
    /// The feedback store (also the recorder) when one is open; feedback routes answer 503
    /// without it.
    pub feedback: Option<Arc<dyn FeedbackStore>>,
    backend: OnceLock<Arc<dyn Backend>>,
    adapters: OnceLock<Arc<AdapterRegistry>>,
    /// Configured plugins, loaded before serving.
    pub plugins: Plugins,
    /// Training jobs and the trainer.
    pub training: Training,
    /// Per-tenant admission limits.
    pub quotas: Arc<TenantQuotas>,
    lifecycle: AtomicU8,
}

impl AppState {
    /// State for `config`, loading, with an in-memory recorder.
    pub fn new(config: Config) -> Result<Arc<Self>, prometheus::Error> {
        Self::with_recorder(config, Arc::new(InMemoryRecorder::new(IN_MEMORY_RECORDS)))
    }

    /// State with a chosen recorder.
    pub fn with_recorder(
        config: Config,
        recorder: Arc<dyn CompletionRecorder>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        Self::build(config, recorder, None)
    }

    /// State whose completions and feedback go to `store`.
    pub fn with_feedback<S: FeedbackStore>(
        config: Config,
        store: Arc<S>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let recorder: Arc<dyn CompletionRecorder> = Arc::clone(&store) as _;
        Self::build(config, recorder, Some(store))
    }

    fn build(
        config: Config,
        recorder: Arc<dyn CompletionRecorder>,
        feedback: Option<Arc<dyn FeedbackStore>>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let plugins = Plugins::load(&config.server.plugin_dir, &config.plugins);
        let training = Training::new(&config, &plugins);
        let quotas = TenantQuotas::new(
            config.limits.tenant_max_sequences,
            config.limits.tenant_max_tokens,
        );
        Ok(Arc::new(AppState {
            keys: Arc::new(KeyTable::from_config(&config)),
            config: Arc::new(config),
            metrics: Metrics::new()?,
            recorder,
            feedback,
            backend: OnceLock::new(),
            adapters: OnceLock::new(),
            plugins,
            training,
            quotas,
            lifecycle: AtomicU8::new(Lifecycle::Loading as u8),
        }))
    }

    /// Installs the adapter registry (once the model's shape is known).
    pub fn set_adapters(&self, registry: Arc<AdapterRegistry>) {
        let _ = self.adapters.set(registry);
    }

    /// The adapter registry: 503 until the model is loaded.
    pub fn adapters(&self) -> Result<&Arc<AdapterRegistry>, ApiError> {
        self.adapters
            .get()
            .ok_or_else(|| ApiError::Unavailable("the model is loading; retry shortly".into()))
    }

    /// Installs the loaded backend and becomes ready (unless already draining).
    pub fn set_backend(&self, backend: Arc<dyn Backend>) {
        let _ = self.backend.set(backend);
        let _ = self.lifecycle.compare_exchange(
            Lifecycle::Loading as u8,
            Lifecycle::Ready as u8,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Marks loading as failed.
    pub fn set_failed(&self) {
        self.lifecycle
            .store(Lifecycle::Failed as u8, Ordering::SeqCst);
    }

    /// Starts draining.
    pub fn start_draining(&self) {
        self.lifecycle
            .store(Lifecycle::Draining as u8, Ordering::SeqCst);
    }

    /// The current lifecycle.
    pub fn lifecycle(&self) -> Lifecycle {
        match self.lifecycle.load(Ordering::SeqCst) {
            0 => Lifecycle::Loading,
            1 => Lifecycle::Ready,
            2 => Lifecycle::Draining,
            _ => Lifecycle::Failed,
        }
    }

    /// The backend, if loaded (also while draining).
    pub fn loaded_backend(&self) -> Option<&Arc<dyn Backend>> {
        self.backend.get()
    }

    /// The backend for a new request: 503 while loading or draining.
    pub fn backend(&self) -> Result<Arc<dyn Backend>, ApiError> {
        match self.lifecycle() {
            Lifecycle::Ready => self
                .backend
                .get()
                .cloned()
                .ok_or_else(|| ApiError::Unavailable("the model is loading".into())),
            Lifecycle::Loading => Err(ApiError::Unavailable(
                "the model is loading; retry shortly".into(),
            )),
            Lifecycle::Draining => Err(ApiError::Unavailable("the server is shutting down".into())),
            Lifecycle::Failed => Err(ApiError::Unavailable("the model failed to load".into())),
        }
    }

    /// Resolves a request's `model` for `principal`: the base id, or one of the tenant's
    /// adapters as `name` (its current version) or `name@N`. The adapter is leased here, at
    /// admission, so the request keeps this version to its end. Loading an evicted version
    /// from disk runs off the async workers. Unknown names are 404 `model_not_found`.
    pub async fn resolve_model(
        &self,
        principal: &Principal,
        model: &str,
    ) -> Result<ResolvedModel, ApiError> {
        let base = || ResolvedModel {
            requested: model.to_string(),
            version_label: "base".into(),
            adapter: None,
        };
        if model == self.config.model.id {
            return Ok(base());
        }
        let Some(tenant) = principal.tenant.clone() else {
            return Err(ApiError::ModelNotFound(model.to_string()));
        };
        // Until the model is loaded the registry does not exist: 503, like the base model.
        let registry = self.adapters()?;
        let registry = Arc::clone(registry);
        let name = model.to_string();
        let lease = tokio::task::spawn_blocking(move || registry.acquire(&tenant, &name))
            .await
            .map_err(|e| ApiError::Internal(format!("adapter load task failed: {e}")))?
            .map_err(|e| match e {
                AdapterError::NotFound(_) | AdapterError::BadRequest(_) => {
                    ApiError::ModelNotFound(model.to_string())
                }
                other => ApiError::from(other),
            })?;
        Ok(match lease {
            None => base(),
            Some(lease) => ResolvedModel {
                requested: model.to_string(),
                version_label: lease.label(),
                adapter: Some(lease),
            },
        })
    }
}
