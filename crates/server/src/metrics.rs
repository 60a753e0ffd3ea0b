//! Prometheus metrics at `/metrics`.

use crate::AppState;
use axum::extract::State;
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub invocations: Family<StatusLabel, Counter>,
    pub invocation_seconds: Histogram,
    pub live_sessions: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("berth");
        let invocations = Family::<StatusLabel, Counter>::default();
        registry.register(
            "invocations",
            "Invocations answered, by HTTP status",
            invocations.clone(),
        );
        let invocation_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        registry.register(
            "invocation_head_seconds",
            "Time from request to the agent's response head",
            invocation_seconds.clone(),
        );
        let live_sessions = Gauge::default();
        registry.register(
            "live_sessions",
            "Sessions with a live sandbox on this node",
            live_sessions.clone(),
        );
        Self {
            registry,
            invocations,
            invocation_seconds,
            live_sessions,
        }
    }
}

pub async fn render(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics
        .live_sessions
        .set(s.sessions.live_sessions() as i64);
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &s.metrics.registry) {
        return crate::error::ApiError::internal(e).into_response();
    }
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
