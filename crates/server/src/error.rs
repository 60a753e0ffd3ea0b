//! The one place where errors become HTTP responses: a stable code and a
//! sentence; internals never leak.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use berth_log::LogError;
use berth_session::SessionError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn session_not_found() -> Self {
        Self::not_found("session")
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer KEY)",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "access_denied", message)
    }

    pub fn internal(what: impl std::fmt::Display) -> Self {
        tracing::error!(error = %what, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.code, "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        use SessionError::*;
        let msg = e.to_string();
        match e {
            NotFound => Self::session_not_found(),
            AgentMismatch(_) => Self::new(StatusCode::CONFLICT, "session_agent_mismatch", msg),
            QueueFull(_) => Self::new(StatusCode::TOO_MANY_REQUESTS, "session_queue_full", msg),
            TooManySessions(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", msg)
            }
            StartFailed(_) => Self::new(StatusCode::FAILED_DEPENDENCY, "agent_start_failed", msg),
            AgentUnreachable(_) => {
                Self::new(StatusCode::FAILED_DEPENDENCY, "agent_unreachable", msg)
            }
            Terminated(_) => Self::new(StatusCode::CONFLICT, "session_terminated", msg),
            ShuttingDown => Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", msg),
            Quota(berth_session::QuotaError::Sessions { .. }) => {
                Self::new(StatusCode::PAYMENT_REQUIRED, "quota_exceeded", msg)
            }
            Quota(berth_session::QuotaError::Rate { .. }) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", msg)
            }
            IsolationPolicy { .. } => Self::new(StatusCode::FORBIDDEN, "isolation_policy", msg),
            SubstrateUnavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "substrate_unavailable",
                msg,
            ),
            Log(e) => e.into(),
            Driver(e) => Self::internal(e),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::NotFound => Self::session_not_found(),
            other => Self::internal(other),
        }
    }
}

impl From<berth_core::IdError> for ApiError {
    fn from(e: berth_core::IdError) -> Self {
        Self::bad_request("invalid_id", e.to_string())
    }
}
