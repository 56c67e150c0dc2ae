//! `POST /v1/feedback`, `GET /v1/feedback/stats`, `GET /v1/feedback/export` and (admin)
//! `DELETE /v1/feedback`: validate the request, hand it to the [`FeedbackStore`], map its
//! errors. A 2xx is sent only after the store has committed the write.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::feedback::{trl, FeedbackError, FeedbackStore, NewFeedback, Rating};
use crate::state::AppState;

/// Header that makes a retried submission return the first one's result.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Longest accepted `completion_id` or adapter name.
const MAX_ID_CHARS: usize = 256;

impl From<FeedbackError> for ApiError {
    fn from(e: FeedbackError) -> Self {
        match e {
            FeedbackError::CompletionNotFound(_) => ApiError::NotFound(e.to_string()),
            FeedbackError::ChoiceOutOfRange { .. } => {
                ApiError::invalid("choice_index", e.to_string())
            }
            FeedbackError::IdempotencyKeyReused { .. } => ApiError::InvalidRequest {
                message: e.to_string(),
                param: Some("Idempotency-Key".into()),
                code: Some("idempotency_key_reused"),
            },
            FeedbackError::WriterGone => ApiError::Unavailable(e.to_string()),
            FeedbackError::InvalidData(_)
            | FeedbackError::Storage(_)
            | FeedbackError::SchemaTooNew { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

fn store(state: &AppState) -> Result<Arc<dyn FeedbackStore>, ApiError> {
    state
        .feedback
        .clone()
        .ok_or_else(|| ApiError::Unavailable("no feedback store is configured".into()))
}

/// `?adapter=<name>` of the stats, export and delete routes.
#[derive(Debug, Deserialize)]
pub struct AdapterQuery {
    /// Adapter name; `base` for the base model.
    adapter: Option<String>,
}

fn adapter_param(q: Result<Query<AdapterQuery>, QueryRejection>) -> Result<String, ApiError> {
    let Query(q) = q.map_err(|r| ApiError::invalid_body(r.body_text()))?;
    match q.adapter {
        Some(a) if !a.trim().is_empty() && a.chars().count() <= MAX_ID_CHARS => Ok(a),
        Some(_) => Err(ApiError::invalid(
            "adapter",
            format!("`adapter` must be 1 to {MAX_ID_CHARS} characters"),
        )),
        None => Err(ApiError::invalid(
            "adapter",
            "missing query parameter `adapter` (an adapter name, or `base` for the base model)",
        )),
    }
}

fn optional_text(
    obj: &Map<String, Value>,
    field: &str,
    limit: usize,
) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() > limit => Err(ApiError::FieldTooLarge {
            param: field.into(),
            size: s.len(),
            limit,
        }),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("`{field}` must be a string"),
        )),
    }
}

/// Parses and validates a `POST /v1/feedback` body.
fn parse_feedback(
    body: &[u8],
    tenant: &str,
    headers: &HeaderMap,
    max_text_bytes: usize,
) -> Result<NewFeedback, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_body(
            "the body is empty: send {\"completion_id\", \"choice_index\", \"rating\"}",
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid_body(format!(
            "the body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::invalid_body(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid_body("the body must be a JSON object"));
    };
    let completion_id = match obj.get("completion_id") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_ID_CHARS => s.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(
                "completion_id",
                format!("`completion_id` must be 1 to {MAX_ID_CHARS} characters"),
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "completion_id",
                "`completion_id` must be a string",
            ))
        }
        None => {
            return Err(ApiError::invalid(
                "completion_id",
                "missing field `completion_id`",
            ))
        }
    };
    let choice_index = match obj.get("choice_index") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                ApiError::invalid(
                    "choice_index",
                    format!("`choice_index` must be a non-negative integer, got {v}"),
                )
            })?,
    };
    let rating = match obj.get("rating") {
        Some(Value::String(s)) => Rating::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "rating",
                format!("`rating` must be \"up\" or \"down\", got {s:?}"),
            )
        })?,
        Some(v) => {
            return Err(ApiError::invalid(
                "rating",
                format!("`rating` must be \"up\" or \"down\", got {v}"),
            ))
        }
        None => return Err(ApiError::invalid("rating", "missing field `rating`")),
    };
    let correction = optional_text(&obj, "correction", max_text_bytes)?;
    let comment = optional_text(&obj, "comment", max_text_bytes)?;
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "Idempotency-Key",
                        format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
                    )
                })?;
            Some(key.to_string())
        }
    };
    Ok(NewFeedback {
        tenant: tenant.to_string(),
        completion_id,
        choice_index,
        rating,
        correction,
        comment,
        idempotency_key,
    })
}

/// `POST /v1/feedback`: 201 on the first submission, 200 on a repeat or update.
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let limit = state.config.limits.max_body_bytes;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::invalid_body(r.body_text())
        }
    })?;
    let tenant = principal.require_tenant()?;
    let fb = parse_feedback(
        &body,
        &tenant,
        &headers,
        state.config.feedback.max_text_bytes,
    )?;
    let done = store(&state)?.submit(fb).await?;
    state
        .metrics
        .feedback
        .with_label_values(&[done.rating.as_str()])
        .inc();
    let status = if done.created_now {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = json!({
        "id": done.id,
        "object": "feedback",
        "completion_id": done.completion_id,
        "choice_index": done.choice_index,
        "rating": done.rating,
        "created": done.created,
    });
    Ok((status, Json(body)).into_response())
}

/// `GET /v1/feedback/stats?adapter=<name>`.
pub async fn stats(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<AdapterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let adapter = adapter_param(query)?;
    let s = store(&state)?.stats(&tenant, &adapter).await?;
    let mut body = serde_json::to_value(&s).map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Value::Object(o) = &mut body {
        o.insert("object".into(), json!("feedback.stats"));
        o.insert("adapter".into(), json!(adapter));
    }
    Ok(Json(body).into_response())
}

/// `GET /v1/feedback/export?adapter=<name>`: TRL preference JSON Lines, one row per pair.
pub async fn export(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<AdapterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let tenant = principal.require_tenant()?;
    let adapter = adapter_param(query)?;
    let ex = store(&state)?.training_examples(&tenant, &adapter).await?;
    let (lines, _skipped) = trl::export_lines(&ex.pairs);
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], lines).into_response())
}

/// `DELETE /v1/feedback?adapter=<name>` (admin, with `X-Tenant`): removes that adapter's
/// completions, feedback and training marks.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<AdapterQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    if !principal.admin {
        return Err(ApiError::Forbidden(
            "deleting feedback needs an admin key".into(),
        ));
    }
    let Some(tenant) = principal.tenant.as_deref() else {
        return Err(ApiError::invalid(
            "X-Tenant",
            "name the tenant whose feedback to delete with the X-Tenant header",
        ));
    };
    let adapter = adapter_param(query)?;
    let d = store(&state)?.delete_adapter(tenant, &adapter).await?;
    Ok(Json(json!({
        "object": "feedback.deleted",
        "tenant": tenant,
        "adapter": adapter,
        "deleted": true,
        "completions": d.completions,
        "feedback": d.feedback,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &[u8]) -> Result<NewFeedback, ApiError> {
        parse_feedback(body, "acme", &HeaderMap::new(), 16)
    }

    fn param_of(e: ApiError) -> (u16, Option<String>) {
        (e.status().as_u16(), e.object().param)
    }

    #[test]
    fn accepts_a_minimal_body() {
        let fb = parse(br#"{"completion_id": "chatcmpl-1", "rating": "down"}"#).expect("ok");
        assert_eq!(fb.choice_index, 0);
        assert_eq!(fb.rating, Rating::Down);
        assert_eq!(fb.tenant, "acme");
    }

    #[test]
    fn refuses_each_bad_field_with_its_param() {
        let cases: &[(&[u8], u16, Option<&str>)] = &[
            (b"", 400, None),
            (b"  \n", 400, None),
            (b"{", 400, None),
            (b"[]", 400, None),
            (b"\xff\xfe{}", 400, None),
            (br#"{"rating": "up"}"#, 400, Some("completion_id")),
            (
                br#"{"completion_id": 5, "rating": "up"}"#,
                400,
                Some("completion_id"),
            ),
            (
                br#"{"completion_id": "c", "rating": "meh"}"#,
                400,
                Some("rating"),
            ),
            (
                br#"{"completion_id": "c", "rating": 1}"#,
                400,
                Some("rating"),
            ),
            (br#"{"completion_id": "c"}"#, 400, Some("rating")),
            (
                br#"{"completion_id": "c", "rating": "up", "choice_index": -1}"#,
                400,
                Some("choice_index"),
            ),
            (
                br#"{"completion_id": "c", "rating": "up", "choice_index": 1.5}"#,
                400,
                Some("choice_index"),
            ),
            (
                br#"{"completion_id": "c", "rating": "up", "correction": 3}"#,
                400,
                Some("correction"),
            ),
            (
                br#"{"completion_id": "c", "rating": "up", "correction": "01234567890123456"}"#,
                413,
                Some("correction"),
            ),
            (
                br#"{"completion_id": "c", "rating": "up", "comment": "01234567890123456"}"#,
                413,
                Some("comment"),
            ),
        ];
        for (body, status, param) in cases {
            let e = parse(body).expect_err(&String::from_utf8_lossy(body));
            assert_eq!(
                param_of(e),
                (*status, param.map(str::to_string)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn idempotency_key_comes_from_the_header() {
        let mut h = HeaderMap::new();
        h.insert(IDEMPOTENCY_KEY_HEADER, "abc".parse().expect("header"));
        let fb = parse_feedback(br#"{"completion_id": "c", "rating": "up"}"#, "acme", &h, 16)
            .expect("ok");
        assert_eq!(fb.idempotency_key.as_deref(), Some("abc"));
        h.insert(IDEMPOTENCY_KEY_HEADER, "  ".parse().expect("header"));
        let e = parse_feedback(br#"{"completion_id": "c", "rating": "up"}"#, "acme", &h, 16)
            .expect_err("blank key");
        assert_eq!(param_of(e), (400, Some("Idempotency-Key".into())));
    }

    #[test]
    fn store_errors_map_to_statuses() {
        let cases = [
            (FeedbackError::CompletionNotFound("x".into()), 404),
            (
                FeedbackError::ChoiceOutOfRange {
                    index: 2,
                    choices: 1,
                },
                400,
            ),
            (FeedbackError::WriterGone, 503),
            (FeedbackError::Storage("disk".into()), 500),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status().as_u16(), status);
        }
    }
}
