//! `POST /v1/training/jobs`, `GET /v1/training/jobs`, `GET /v1/training/jobs/{id}` and
//! `DELETE /v1/training/jobs/{id}`: validate, hand over to [`crate::training`], show jobs.
//! A tenant key sees only its own tenant's jobs; an admin key sees every tenant's unless it
//! names one with `X-Tenant`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::routes::inference::body_bytes;
use crate::state::AppState;
use crate::training::{self, Overrides, Trigger};

/// Fields a job request may carry besides `adapter`.
const OVERRIDE_FIELDS: &[&str] = &[
    "steps",
    "epochs",
    "batch_size",
    "lr",
    "learning_rate",
    "beta",
    "sft_weight",
    "seed",
];

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("training job `{id}` not found"))
}

/// Largest `steps` a request may ask for: a job holds its adapter's training slot and one of
/// the global ones until it ends (the trainer's `timeout_secs` stops it at the latest).
pub const MAX_STEPS: usize = 100_000;
/// Largest `epochs`.
pub const MAX_EPOCHS: usize = 1_000;
/// Largest `batch_size` (a batch never exceeds the data anyway).
pub const MAX_BATCH_SIZE: usize = 1_024;

fn positive_int(
    obj: &Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<usize>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| (1..=max).contains(&n))
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(
                    field,
                    format!("`{field}` must be an integer from 1 to {max}"),
                )
            }),
    }
}

fn number(obj: &Map<String, Value>, field: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(
                    field,
                    format!("`{field}` must be a finite non-negative number"),
                )
            }),
    }
}

/// Parses a job request: `adapter` and the overrides; any other field is refused (a typo
/// must not train with defaults silently).
fn parse_request(body: &[u8]) -> Result<(String, Overrides), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_body(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid_body("the body must be a JSON object"));
    };
    for key in obj.keys() {
        if key != "adapter" && !OVERRIDE_FIELDS.contains(&key.as_str()) {
            return Err(ApiError::invalid(
                key,
                format!(
                    "unknown field `{key}`; a job takes `adapter` and optionally {}",
                    OVERRIDE_FIELDS.join(", ")
                ),
            ));
        }
    }
    let adapter = match obj.get("adapter") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "adapter",
                "`adapter` must be a non-empty string",
            ))
        }
        None => return Err(ApiError::invalid("adapter", "missing field `adapter`")),
    };
    let seed =
        match obj.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                ApiError::invalid("seed", "`seed` must be a non-negative integer")
            })?),
        };
    let lr = match number(&obj, "lr")? {
        Some(v) => Some(v),
        None => number(&obj, "learning_rate")?,
    };
    let overrides = Overrides {
        steps: positive_int(&obj, "steps", MAX_STEPS)?,
        epochs: positive_int(&obj, "epochs", MAX_EPOCHS)?,
        batch_size: positive_int(&obj, "batch_size", MAX_BATCH_SIZE)?,
        lr,
        beta: number(&obj, "beta")?,
        sft_weight: number(&obj, "sft_weight")?,
        seed,
    };
    if overrides.beta == Some(0.0) {
        return Err(ApiError::invalid("beta", "`beta` must be positive"));
    }
    Ok((adapter, overrides))
}

/// `POST /v1/training/jobs` → 202 with the queued job.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let body = body_bytes(body, state.config.limits.max_body_bytes)?;
    let (adapter, overrides) = parse_request(&body)?;
    let job = training::submit(&state, &tenant, &adapter, &overrides, Trigger::Manual).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// `GET /v1/training/jobs`, newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
) -> Response {
    let data = state.training.list(principal.tenant.as_deref());
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/training/jobs/{id}`.
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state
        .training
        .get(principal.tenant.as_deref(), &id)
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(job).into_response())
}

/// `DELETE /v1/training/jobs/{id}`: asks the job to stop and returns it (a running job turns
/// `cancelled` at the trainer's next step).
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = state
        .training
        .cancel(principal.tenant.as_deref(), &id)
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(job).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_adapter_and_overrides() {
        let (a, o) = parse_request(
            br#"{"adapter": "support", "steps": 3, "beta": 0.2, "learning_rate": 0.001}"#,
        )
        .expect("valid");
        assert_eq!(a, "support");
        assert_eq!(o.steps, Some(3));
        assert_eq!(o.beta, Some(0.2));
        assert_eq!(o.lr, Some(0.001));
    }

    #[test]
    fn refuses_bad_requests_naming_the_field() {
        for (body, param) in [
            (&br#"{"steps": 3}"#[..], "adapter"),
            (br#"{"adapter": ""}"#, "adapter"),
            (br#"{"adapter": "a", "steps": 0}"#, "steps"),
            (br#"{"adapter": "a", "steps": -1}"#, "steps"),
            (br#"{"adapter": "a", "steps": 100001}"#, "steps"),
            (br#"{"adapter": "a", "epochs": 1001}"#, "epochs"),
            (br#"{"adapter": "a", "batch_size": 1025}"#, "batch_size"),
            (br#"{"adapter": "a", "steps": 1e30}"#, "steps"),
            (br#"{"adapter": "a", "beta": 0}"#, "beta"),
            (br#"{"adapter": "a", "lr": "fast"}"#, "lr"),
            (br#"{"adapter": "a", "stpes": 3}"#, "stpes"),
        ] {
            match parse_request(body) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{}", String::from_utf8_lossy(body))
                }
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        assert!(parse_request(b"not json").is_err());
        assert!(parse_request(b"[1]").is_err());
    }
}
