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
    Extension(_principal): Extension<Principal>,
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
    Json(ModelList {
        object: "list",
        data: vec![base],
    })
    .into_response()
}
