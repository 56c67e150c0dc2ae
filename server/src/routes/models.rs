//! `GET /v1/models`: the base model, then (once adapters exist) the tenant's adapters.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::auth::Principal;
use crate::openai::response::{ModelCard, ModelList};
use crate::state::AppState;

/// Owner shown for the base model.
const BASE_OWNER: &str = "prefix-rft";

/// Lists what `principal` can send as `model`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
) -> Response {
    let (created, context) = state
        .loaded_backend()
        .map(|b| (b.info().created, b.info().context_length))
        .unwrap_or((crate::unix_now(), 0));
    let base = ModelCard {
        id: state.config.model.id.clone(),
        object: "model",
        created,
        owned_by: BASE_OWNER.into(),
        parent: None,
        version: None,
        max_model_len: context,
    };
    let mut data = vec![base];
    // A tenant's adapters are models too (as vLLM and LoRAX list them): `name` serves the
    // current version, `name@N` a fixed one.
    if let (Some(tenant), Ok(registry)) = (principal.tenant.clone(), state.adapters()) {
        let registry = std::sync::Arc::clone(registry);
        let listed = tokio::task::spawn_blocking(move || registry.list(&tenant)).await;
        if let Ok(Ok(adapters)) = listed {
            for a in adapters {
                data.push(ModelCard {
                    id: a.meta.name.clone(),
                    object: "model",
                    created: a.meta.created,
                    owned_by: principal.tenant_label().to_string(),
                    parent: Some(state.config.model.id.clone()),
                    version: Some(u64::from(a.current)),
                    max_model_len: context,
                });
            }
        }
    }
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}
