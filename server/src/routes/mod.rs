//! The axum router: which path goes to which handler, behind which middleware. Handlers live
//! in one file per concern; this file holds only wiring and the request counter.

pub mod adapters;
pub mod console;
pub mod feedback;
pub mod inference;
pub mod models;
pub mod ops;
pub mod training;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;

use crate::auth;
use crate::state::AppState;
use inference::{AdapterLabel, LoggedByHandler};

/// The whole HTTP surface for `state`.
pub fn router(state: Arc<AppState>) -> Router {
    // An upload carries a whole adapter: its own body limit, a little above the file limit.
    let upload_limit = usize::try_from(state.config.adapters.max_file_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(1 << 20);
    let v1 = Router::new()
        .route("/v1/chat/completions", post(inference::chat))
        .route("/v1/completions", post(inference::completions))
        .route("/v1/models", get(models::list))
        .route("/v1/adapters", get(adapters::list).post(adapters::create))
        .route(
            "/v1/adapters/{name}",
            get(adapters::get_one).delete(adapters::delete),
        )
        .route(
            "/v1/adapters/{name}/versions",
            post(adapters::upload_version).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/adapters/{name}/activate", post(adapters::activate))
        .route(
            "/v1/adapters/{name}/versions/{version}/files/{file}",
            get(adapters::file),
        )
        .route("/v1/plugins", get(ops::plugins))
        .route("/v1/load_lora_adapter", post(adapters::load_lora))
        .route("/v1/unload_lora_adapter", post(adapters::unload_lora))
        .route(
            "/v1/feedback",
            post(feedback::submit).merge(delete(feedback::delete)),
        )
        .route("/v1/feedback/stats", get(feedback::stats))
        .route("/v1/feedback/export", get(feedback::export))
        .route(
            "/v1/training/jobs",
            get(training::list).post(training::create),
        )
        .route(
            "/v1/training/jobs/{id}",
            get(training::get_one).delete(training::cancel),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.keys),
            auth::require_key,
        ));
    Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        // The console's static files need no key; the page sends one to `/v1` itself.
        .merge(console::router())
        .merge(v1)
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), observe))
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .with_state(state)
}

/// Counts every routed request and logs those a handler did not log itself.
async fn observe(
    State(state): State<Arc<AppState>>,
    path: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = path
        .as_ref()
        .map(MatchedPath::as_str)
        .unwrap_or("unmatched")
        .to_string();
    let method = req.method().clone();
    let response = next.run(req).await;
    let status = response.status();
    let adapter = response
        .extensions()
        .get::<AdapterLabel>()
        .map(|a| a.0.as_str())
        .unwrap_or("");
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), status.as_str(), adapter])
        .inc();
    if response.extensions().get::<LoggedByHandler>().is_none()
        && route != "/metrics"
        && route != "/health"
    {
        tracing::info!(
            target: "prefix_rft::request",
            %method,
            route,
            status = status.as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    response
}
