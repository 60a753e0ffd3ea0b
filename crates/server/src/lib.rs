//! berth's server: the HTTP API (axum), authentication, configuration, and
//! the wiring of the store, the session manager and the sandbox driver.

pub mod audit;
pub mod auth;
pub mod config;
pub mod deploy;
pub mod error;
pub mod workload;

mod agents;
mod dev;
mod invoke;
mod metrics;
mod serve;
mod sessions;
pub mod substrates;

pub use config::{Config, ConfigError};
pub use serve::{run, ServerError};

use axum::routing::{delete, get, post};
use axum::Router;
use std::sync::Arc;

/// Everything a request handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<berth_log::SqliteLog>,
    pub sessions: berth_session::SessionManager,
    pub cfg: Arc<Config>,
    pub deploy: Arc<deploy::DeployConfig>,
    pub agents: Arc<agents::AgentCache>,
    pub metrics: Arc<metrics::Metrics>,
    pub oidc: Option<Arc<auth::oidc::OidcVerifier>>,
    pub sigv4: Arc<auth::sigv4::SigV4Verifier>,
    pub workload: Arc<workload::WorkloadTokenService>,
}

/// The whole HTTP API.
pub fn app(state: AppState) -> Router {
    let archive_limit = state.deploy.max_archive_bytes as usize;
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/.well-known/jwks.json", get(workload::jwks))
        .route("/v1/workload/verify", post(workload::verify))
        .route("/metrics", get(metrics::render))
        .route(
            "/v1/agents",
            get(agents::list)
                .post(agents::deploy)
                .layer(axum::extract::DefaultBodyLimit::max(archive_limit)),
        )
        .route(
            "/v1/agents/{agent}",
            get(agents::show).delete(agents::remove),
        )
        .route(
            "/v1/agents/{agent}/versions/{version}",
            delete(agents::remove_version),
        )
        .route("/v1/agents/{agent}/invocations", post(invoke::v1))
        .route("/runtimes/{arn}/invocations", post(invoke::agentcore))
        .route(
            "/runtimes/{arn}/stopruntimesession",
            post(sessions::agentcore_stop),
        )
        .route("/v1/sessions", get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::show).delete(sessions::stop),
        )
        .route("/v1/sessions/{id}/events", get(sessions::events))
        .route("/v1/sessions/{id}/events/stream", get(sessions::stream))
        .route("/v1/usage", get(sessions::usage))
        .route("/v1/audit", get(audit::list))
        .route("/v1/substrates", get(substrates::list))
        .fallback(|| async { error::ApiError::not_found("route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::layer,
        ))
        .with_state(state)
}
