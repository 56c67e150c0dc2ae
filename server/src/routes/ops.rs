//! Operations routes, no key needed: liveness, readiness, Prometheus metrics, the OpenAPI
//! document.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::state::{AppState, Lifecycle};

/// `GET /health`: 200 while the process lives.
pub async fn health() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// `GET /ready`: 200 once the model is loaded; 503 while loading, draining or failed.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let (status, word) = match state.lifecycle() {
        Lifecycle::Ready => (StatusCode::OK, "ready"),
        Lifecycle::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        Lifecycle::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        Lifecycle::Failed => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
    };
    (status, Json(serde_json::json!({"status": word}))).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Ok(registry) = state.adapters() {
        let stats = registry.stats();
        let m = &state.metrics;
        m.adapters_resident.set(stats.resident as i64);
        m.adapters_resident_bytes.set(stats.resident_bytes as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn openapi() -> Response {
    Json(crate::openapi::document()).into_response()
}

/// `GET /v1/plugins` (admin): the configured plugins with name, kind, ABI version, status.
pub async fn plugins(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<crate::state::AppState>>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
) -> Result<axum::response::Response, crate::error::ApiError> {
    if !principal.admin {
        return Err(crate::error::ApiError::Forbidden(
            "this route needs an admin key".into(),
        ));
    }
    Ok(axum::response::IntoResponse::into_response(axum::Json(
        state.plugins.to_json(),
    )))
}
