//! The HTTP edge's one error type and its one mapping to a status code plus OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`. Every other layer's error converts into
//! [`ApiError`]; nothing else in the server builds an error response.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why a request failed, as the client sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A field is missing, of the wrong type or out of range; `param` names it when known.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// The prompt (plus the requested new tokens) does not fit the context.
    #[error("{message}")]
    ContextLength {
        message: String,
        param: Option<String>,
    },
    /// No or unknown API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid key that may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The `model` names nothing this tenant can use.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// Any other missing resource or route.
    #[error("{0}")]
    NotFound(String),
    /// The body is larger than `[limits] max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// One field (`param`) is larger than its configured limit.
    #[error("`{param}` is {size} bytes, over the limit of {limit} bytes")]
    FieldTooLarge {
        param: String,
        size: usize,
        limit: usize,
    },
    /// The queue is full; retry after the given seconds.
    #[error("the server is at capacity; retry after {retry_after_secs} s")]
    Overloaded { retry_after_secs: u64 },
    /// The tenant has as much admitted as its limits allow; retry after the given seconds.
    #[error("{message}")]
    TenantLimit {
        message: String,
        retry_after_secs: u64,
    },
    /// The model is loading or the server is draining.
    #[error("{0}")]
    Unavailable(String),
    /// A compare-and-swap or name conflict.
    #[error("{0}")]
    Conflict(String),
    /// Adapter files that do not fit the base model.
    #[error("{0}")]
    Unprocessable(String),
    /// A bug or an engine failure; details are logged, not sent.
    #[error("{0}")]
    Internal(String),
}

/// The `error` object of OpenAI's error body.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorObject {
    /// Human-readable message.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`).
    pub code: Option<&'static str>,
}

/// OpenAI's error body.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 about the request as a whole (e.g. JSON that does not parse).
    pub fn invalid_body(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// The HTTP status this error is sent with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } | ApiError::ContextLength { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } | ApiError::FieldTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::Overloaded { .. } | ApiError::TenantLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body's `error` object.
    pub fn object(&self) -> ErrorObject {
        let (kind, param, code) = match self {
            ApiError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", param.clone(), *code)
            }
            ApiError::ContextLength { param, .. } => (
                "invalid_request_error",
                param.clone(),
                Some("context_length_exceeded"),
            ),
            ApiError::Unauthenticated(_) => ("authentication_error", None, Some("invalid_api_key")),
            ApiError::Forbidden(_) => ("permission_error", None, None),
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
            ),
            ApiError::NotFound(_) => ("not_found_error", None, None),
            ApiError::PayloadTooLarge { .. } => {
                ("invalid_request_error", None, Some("request_too_large"))
            }
            ApiError::FieldTooLarge { param, .. } => (
                "invalid_request_error",
                Some(param.clone()),
                Some("request_too_large"),
            ),
            ApiError::Overloaded { .. } => ("rate_limit_error", None, Some("server_overloaded")),
            ApiError::TenantLimit { .. } => {
                ("rate_limit_error", None, Some("tenant_limit_exceeded"))
            }
            ApiError::Unavailable(_) => ("service_unavailable_error", None, None),
            ApiError::Conflict(_) => ("conflict_error", None, Some("conflict")),
            ApiError::Unprocessable(_) => ("invalid_request_error", None, Some("invalid_adapter")),
            ApiError::Internal(_) => ("server_error", None, None),
        };
        let message = match self {
            ApiError::Internal(_) => "internal server error".to_string(),
            other => other.to_string(),
        };
        ErrorObject {
            message,
            kind,
            param,
            code,
        }
    }

    /// The whole body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.object(),
        }
    }
}

impl From<prefix_rft_adapters::AdapterError> for ApiError {
    fn from(e: prefix_rft_adapters::AdapterError) -> Self {
        use prefix_rft_adapters::AdapterError as E;
        match e {
            E::Invalid(_) => ApiError::Unprocessable(e.to_string()),
            E::BadRequest(m) => ApiError::invalid_body(m),
            E::NotFound(m) => ApiError::NotFound(m),
            E::Exists(_) | E::Conflict { .. } => ApiError::Conflict(e.to_string()),
            E::TooLarge(m) => ApiError::Unprocessable(m),
            E::Io { .. } | E::Corrupt(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::Overloaded { retry_after_secs }
        | ApiError::TenantLimit {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_is_404_with_model_not_found() {
        let e = ApiError::ModelNotFound("nope".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let body = serde_json::to_value(e.body()).expect("serialises");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn overload_carries_retry_after() {
        let r = ApiError::Overloaded {
            retry_after_secs: 3,
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn internal_detail_is_not_sent() {
        let body = ApiError::Internal("secret path /x".into()).body();
        assert_eq!(body.error.message, "internal server error");
        assert_eq!(body.error.kind, "server_error");
    }

    #[test]
    fn context_length_has_its_code() {
        let e = ApiError::ContextLength {
            message: "too long".into(),
            param: Some("messages".into()),
        };
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.object().code, Some("context_length_exceeded"));
    }
}
