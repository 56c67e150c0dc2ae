//! The adapter routes of API.md: list, create, upload a version, activate (swap and rollback),
//! download files, delete; and vLLM's admin-only `load_lora_adapter` / `unload_lora_adapter`.
//! Every route acts on the caller's tenant (admin keys send `X-Tenant`); another tenant's
//! adapter is a 404, as if it did not exist.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use prefix_rft_adapters::peft::{self, CONFIG_FILE, WEIGHTS_FILE};
use prefix_rft_adapters::{
    AdapterKind, AdapterListing, AdapterRegistry, Manifest, NewVersion, PeftFiles,
};
use prefix_rft_engine::model::{AdapterWeights, Proj};
use prefix_rft_engine::train::{LoraConfig, TrainAdapter};
use serde::{Deserialize, Serialize};

use super::inference::{blocking, body_bytes, parse_err};
use crate::auth::Principal;
use crate::config::ModelBackend;
use crate::error::ApiError;
use crate::openai::request::parse_one;
use crate::state::AppState;

/// `init_text` when a prefix adapter is created without one.
const DEFAULT_INIT_TEXT: &str = "You are a helpful assistant.";

/// One version as listed.
#[derive(Debug, Serialize)]
pub struct VersionView {
    /// Version number.
    pub version: u32,
    /// Unix seconds.
    pub created: u64,
    /// Parent version.
    pub parent: Option<u32>,
    /// `upload` or `training`.
    pub source: prefix_rft_adapters::Source,
    /// `live`, `candidate` or `rejected`.
    pub status: prefix_rft_adapters::Status,
    /// Eval metrics.
    pub metrics: Option<serde_json::Value>,
    /// Why it was rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The training job that made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// sha256 of its files.
    pub sha256: std::collections::BTreeMap<String, String>,
}

impl From<Manifest> for VersionView {
    fn from(m: Manifest) -> Self {
        VersionView {
            version: m.version,
            created: m.created,
            parent: m.parent,
            source: m.source,
            status: m.status,
            metrics: m.metrics,
            reason: m.reason,
            job_id: m.job_id,
            sha256: m.sha256,
        }
    }
}

/// One adapter as listed.
#[derive(Debug, Serialize)]
pub struct AdapterView {
    /// Its name (what clients send as `model`).
    pub name: String,
    /// Always `adapter`.
    pub object: &'static str,
    /// `lora`, `prefix` or `lora+prefix`.
    pub kind: AdapterKind,
    /// Unix seconds of creation.
    pub created: u64,
    /// Current version.
    pub current: u32,
    /// Creation parameters.
    pub params: serde_json::Value,
    /// Versions, oldest first.
    pub versions: Vec<VersionView>,
}

impl From<AdapterListing> for AdapterView {
    fn from(l: AdapterListing) -> Self {
        AdapterView {
            name: l.meta.name,
            object: "adapter",
            kind: l.meta.kind,
            created: l.meta.created,
            current: l.current,
            params: l.meta.params,
            versions: l.versions.into_iter().map(VersionView::from).collect(),
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("adapter `{name}` not found"))
}

/// Runs a registry operation off the async workers (it does disk I/O and fsyncs).
async fn with_registry<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&AdapterRegistry) -> Result<T, prefix_rft_adapters::AdapterError> + Send + 'static,
) -> Result<T, ApiError> {
    let registry = Arc::clone(state.adapters()?);
    blocking(move || f(&registry))
        .await?
        .map_err(ApiError::from)
}

/// `GET /v1/adapters`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let listings = with_registry(&state, move |r| r.list(&tenant)).await?;
    let data: Vec<AdapterView> = listings.into_iter().map(AdapterView::from).collect();
    Ok(Json(serde_json::json!({"object": "list", "data": data})).into_response())
}

/// `GET /v1/adapters/{name}`.
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let listing = with_registry(&state, move |r| r.store().listing(&tenant, &name)).await?;
    Ok(Json(AdapterView::from(listing)).into_response())
}

/// The body of `POST /v1/adapters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAdapter {
    /// Name, unique per tenant.
    pub name: String,
    /// `lora`, `prefix` or `lora+prefix`.
    pub kind: AdapterKind,
    /// LoRA rank (default 16).
    pub rank: Option<usize>,
    /// LoRA alpha (default 2 × rank).
    pub alpha: Option<f64>,
    /// rsLoRA scaling (default false).
    pub use_rslora: Option<bool>,
    /// Projections (default all seven).
    pub target_modules: Option<Vec<String>>,
    /// Prefix virtual tokens (default 16).
    pub num_virtual_tokens: Option<usize>,
    /// Text whose base activations initialise the prefix.
    pub init_text: Option<String>,
    /// Seed of the LoRA A initialisation (default 0).
    pub seed: Option<u64>,
}

/// `POST /v1/adapters`: a new adapter whose version 1 is the identity (LoRA B = 0) and/or a
/// prefix taken from the base model's activations on `init_text`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let limit = state.config.limits.max_body_bytes;
    let req: CreateAdapter = parse_one(&body_bytes(body, limit)?).map_err(parse_err)?;
    let registry = Arc::clone(state.adapters()?);
    let limits = *registry.limits();
    prefix_rft_adapters::store::check_name("adapter name", &req.name)
        .map_err(|e| ApiError::invalid("name", e.to_string()))?;
    if req.name == state.config.model.id {
        return Err(ApiError::invalid("name", "the base model's id is reserved"));
    }
    let has_lora = matches!(req.kind, AdapterKind::Lora | AdapterKind::LoraPrefix);
    let has_prefix = matches!(req.kind, AdapterKind::Prefix | AdapterKind::LoraPrefix);
    let lora = if has_lora {
        let rank = req.rank.unwrap_or(16);
        if rank == 0 || rank > limits.max_rank {
            return Err(ApiError::invalid(
                "rank",
                format!("rank must be within 1..={}", limits.max_rank),
            ));
        }
        let alpha = req.alpha.unwrap_or(2.0 * rank as f64);
        let rslora = req.use_rslora.unwrap_or(false);
        if !alpha.is_finite() || alpha <= 0.0 {
            return Err(ApiError::invalid(
                "alpha",
                "alpha must be a positive number",
            ));
        }
        if !peft::lora_scale_fits(alpha, rank, rslora) {
            return Err(ApiError::invalid(
                "alpha",
                format!("alpha {alpha} gives a delta scale beyond f32's range"),
            ));
        }
        let targets = match &req.target_modules {
            None => Proj::ALL.to_vec(),
            Some(names) if names.is_empty() => {
                return Err(ApiError::invalid("target_modules", "must not be empty"))
            }
            Some(names) => names
                .iter()
                .map(|n| {
                    Proj::from_module_name(n).ok_or_else(|| {
                        ApiError::invalid(
                            "target_modules",
                            format!(
                                "unknown module `{n}`; supported: q_proj, k_proj, v_proj, \
                                 o_proj, gate_proj, up_proj, down_proj"
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        Some(LoraConfig {
            rank,
            alpha,
            rslora,
            targets,
            seed: req.seed.unwrap_or(0),
        })
    } else {
        None
    };
    let prefix_n = if has_prefix {
        let n = req.num_virtual_tokens.unwrap_or(16);
        if n == 0 || n > limits.max_virtual_tokens {
            return Err(ApiError::invalid(
                "num_virtual_tokens",
                format!("must be within 1..={}", limits.max_virtual_tokens),
            ));
        }
        Some(n)
    } else {
        None
    };
    let backend = state.backend()?;
    let params = serde_json::json!({
        "rank": lora.as_ref().map(|l| l.rank),
        "alpha": lora.as_ref().map(|l| l.alpha),
        "use_rslora": lora.as_ref().map(|l| l.rslora),
        "target_modules": lora.as_ref().map(|l| l.targets.iter().map(|p| p.module_name()).collect::<Vec<_>>()),
        "num_virtual_tokens": prefix_n,
    });
    let init_text = req
        .init_text
        .unwrap_or_else(|| DEFAULT_INIT_TEXT.to_string());
    let name = req.name.clone();
    let manifest = blocking(move || -> Result<Manifest, ApiError> {
        let model = registry.model().clone();
        let mut weights: Option<AdapterWeights> = None;
        if let Some(cfg) = &lora {
            let fresh = TrainAdapter::new(
                &model,
                Some(cfg),
                None,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .and_then(|a| a.to_weights(&model))
            .map_err(|e| ApiError::Internal(format!("initialising LoRA: {e}")))?;
            weights = Some(fresh);
        }
        let prefix = match prefix_n {
            Some(n) => Some(
                backend
                    .prefix_from_text(&init_text, n)
                    .map_err(|e| ApiError::invalid("init_text", e.to_string()))?,
            ),
            None => None,
        };
        let lora_part = weights
            .as_ref()
            .map(|w| w.lora().map(|(k, l)| (*k, l.clone())).collect())
            .unwrap_or_default();
        let weights = AdapterWeights::new(&model, lora_part, prefix)
            .map_err(|e| ApiError::Internal(format!("initial adapter: {e}")))?;
        registry
            .create(&tenant, &name, &weights, params)
            .map_err(ApiError::from)
    })
    .await??;
    let view = serde_json::json!({
        "name": req.name,
        "object": "adapter",
        "kind": manifest.kind,
        "current": manifest.version,
        "versions": [VersionView::from(manifest)],
    });
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `POST /v1/adapters/{name}/versions`: multipart with the two PEFT files (by field name or
/// file name), and optionally `activate` (`true` by default) and `expected_current`.
pub async fn upload_version(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    // The body is read before the adapter is looked up: answering 404 with a large upload
    // still unread makes clients fail writing it (a broken pipe) before they see the answer.
    let mut multipart = multipart.map_err(|e| ApiError::invalid_body(e.body_text()))?;
    let (mut config, mut weights) = (None, None);
    let mut activate = true;
    let mut expected_current = None;
    let multipart_err = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: state.config.adapters.max_file_bytes as usize,
            }
        } else {
            ApiError::invalid_body(format!("multipart body: {}", e.body_text()))
        }
    };
    while let Some(field) = multipart.next_field().await.map_err(multipart_err)? {
        let key = field
            .file_name()
            .filter(|f| *f == CONFIG_FILE || *f == WEIGHTS_FILE)
            .or(field.name())
            .unwrap_or("")
            .to_string();
        let data = field.bytes().await.map_err(multipart_err)?;
        match key.as_str() {
            // Takes the buffer over without a copy where it is the only owner (bytes ≥ 1.5).
            CONFIG_FILE => config = Some(Vec::from(data)),
            WEIGHTS_FILE => weights = Some(Vec::from(data)),
            "activate" => {
                activate = match std::str::from_utf8(&data).map(str::trim) {
                    Ok("true") => true,
                    Ok("false") => false,
                    _ => return Err(ApiError::invalid("activate", "must be true or false")),
                }
            }
            "expected_current" => {
                expected_current = Some(
                    std::str::from_utf8(&data)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok())
                        .ok_or_else(|| {
                            ApiError::invalid("expected_current", "must be a version number")
                        })?,
                )
            }
            other => {
                return Err(ApiError::invalid_body(format!(
                    "unexpected multipart field `{other}`; send {CONFIG_FILE} and {WEIGHTS_FILE}"
                )))
            }
        }
    }
    let (Some(config), Some(weights)) = (config, weights) else {
        return Err(ApiError::invalid_body(format!(
            "the multipart body needs both {CONFIG_FILE} and {WEIGHTS_FILE}"
        )));
    };
    let files = PeftFiles { config, weights };
    let (t, n) = (tenant.clone(), name.clone());
    let manifest = with_registry(&state, move |r| {
        let parent = r.store().current(&t, &n)?;
        r.publish(
            &t,
            &n,
            &files,
            NewVersion::upload(AdapterKind::Lora, Some(parent)),
            activate,
            expected_current,
        )
    })
    .await?;
    if activate {
        prepare(&state, &tenant, &name, manifest.version).await;
    }
    Ok((StatusCode::CREATED, Json(VersionView::from(manifest))).into_response())
}

/// The body of `POST /v1/adapters/{name}/activate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activate {
    /// The version to make current.
    pub version: u32,
    /// Fail with 409 unless this is the current version.
    pub expected_current: Option<u32>,
}

/// Has the backend get `name@version` ready (mistralrs loads its merged model; our engine
/// needs nothing): before an activation moves the alias, and right after a publish that made
/// the version current (an upload with `activate`, vLLM's load route, a promoted training
/// job), so that the reply comes when the version is ready and requests that came meanwhile
/// waited only for the rest of the load. Best effort: a version the backend cannot hold now
/// still becomes current, and its requests say why they are refused.
pub(crate) async fn prepare(state: &Arc<AppState>, tenant: &str, name: &str, version: u32) {
    if state.config.model.backend == ModelBackend::Engine {
        return;
    }
    let Ok(backend) = state.backend() else {
        return;
    };
    let key = (tenant.to_string(), name.to_string(), version);
    // An unknown version is the activation's to refuse, with its own message.
    let Ok(lease) = with_registry(state, move |r| r.lease(key)).await else {
        return;
    };
    let outcome = tokio::task::spawn_blocking(move || backend.prepare(&lease)).await;
    if let Ok(Err(e)) = outcome {
        tracing::warn!(tenant, adapter = name, version, error = %e,
            "the backend could not get the version ready before its activation");
    }
}

/// `POST /v1/adapters/{name}/activate`: swap or roll back.
pub async fn activate(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let limit = state.config.limits.max_body_bytes;
    let req: Activate = parse_one(&body_bytes(body, limit)?).map_err(parse_err)?;
    prepare(&state, &tenant, &name, req.version).await;
    let n = name.clone();
    let previous = with_registry(&state, move |r| {
        r.activate(&tenant, &n, req.version, req.expected_current)
    })
    .await?;
    Ok(Json(serde_json::json!({
        "name": name,
        "current": req.version,
        "previous": previous,
    }))
    .into_response())
}

/// `GET /v1/adapters/{name}/versions/{version}/files/{file}`.
pub async fn file(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path((name, version, file)): Path<(String, u32, String)>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let f = file.clone();
    let bytes = with_registry(&state, move |r| {
        r.store().read_file(&tenant, &name, version, &f)
    })
    .await?;
    let content_type = if file.ends_with(".json") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// `DELETE /v1/adapters/{name}`.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let (t, n) = (tenant.clone(), name.clone());
    with_registry(&state, move |r| r.delete(&t, &n)).await?;
    if let Ok(backend) = state.backend() {
        backend.forget_adapter(&tenant, &name);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of vLLM's `POST /v1/load_lora_adapter`.
#[derive(Debug, Deserialize)]
pub struct LoadLora {
    /// Adapter name.
    pub lora_name: String,
    /// A PEFT directory inside the adapter store.
    pub lora_path: String,
    /// Replace an existing adapter of that name with a new version (vLLM semantics).
    #[serde(default)]
    pub load_inplace: bool,
}

/// The tenant (from `X-Tenant`) and JSON body of an admin-only route.
fn admin_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    principal: &Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<(String, T), ApiError> {
    if !principal.admin {
        return Err(ApiError::Forbidden("this route needs an admin key".into()));
    }
    let tenant = principal.require_tenant()?;
    let limit = state.config.limits.max_body_bytes;
    let req = parse_one(&body_bytes(body, limit)?).map_err(parse_err)?;
    Ok((tenant, req))
}

/// `POST /v1/load_lora_adapter` (admin): registers the PEFT files at `lora_path` (confined to
/// the store root) as a new adapter, or as its new current version with `load_inplace`.
pub async fn load_lora(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (tenant, req): (String, LoadLora) = admin_request(&state, &principal, body)?;
    let name = req.lora_name.clone();
    let t = tenant.clone();
    let current = with_registry(&state, move |r| {
        let tenant = t;
        let dir = r.store().confine(&req.lora_path)?;
        let max = r.limits().max_file_bytes;
        let files = PeftFiles {
            config: prefix_rft_adapters::peft::read_bounded(&dir.join(CONFIG_FILE), 1 << 20)?,
            weights: prefix_rft_adapters::peft::read_bounded(&dir.join(WEIGHTS_FILE), max)?,
        };
        let adapter = r.validate(&files)?;
        let exists = r.store().names(&tenant)?.contains(&req.lora_name);
        match (exists, req.load_inplace) {
            (true, false) => Err(prefix_rft_adapters::AdapterError::Exists(
                req.lora_name.clone(),
            )),
            (true, true) => {
                let parent = r.store().current(&tenant, &req.lora_name)?;
                r.publish(
                    &tenant,
                    &req.lora_name,
                    &files,
                    NewVersion::upload(adapter.kind(), Some(parent)),
                    true,
                    None,
                )
                .map(|_| ())
            }
            (false, _) => r
                .create_from_files(&tenant, &req.lora_name, &files)
                .map(|_| ()),
        }?;
        r.store().current(&tenant, &req.lora_name)
    })
    .await?;
    // vLLM's route returns once the adapter is loaded; so does this one.
    prepare(&state, &tenant, &name, current).await;
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

/// The body of vLLM's `POST /v1/unload_lora_adapter`.
#[derive(Debug, Deserialize)]
pub struct UnloadLora {
    /// Adapter name.
    pub lora_name: String,
}

/// `POST /v1/unload_lora_adapter` (admin): removes the adapter (its versions in the store;
/// the directory it was loaded from is untouched). Running requests finish on their lease.
pub async fn unload_lora(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (tenant, req): (String, UnloadLora) = admin_request(&state, &principal, body)?;
    let name = req.lora_name.clone();
    let t = tenant.clone();
    with_registry(&state, move |r| r.delete(&t, &req.lora_name))
        .await
        .map_err(|e| match e {
            ApiError::NotFound(_) => not_found(&name),
            other => other,
        })?;
    if let Ok(backend) = state.backend() {
        backend.forget_adapter(&tenant, &name);
    }
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}
