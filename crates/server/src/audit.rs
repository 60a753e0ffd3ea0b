//! The audit trail of the API: failed authentications, denied accesses and
//! admin actions go to the log's audit table; admins read their tenant's
//! events with `GET /v1/audit`.
//!
//! Recording never delays a response: the append runs in its own task. At
//! most [`MAX_PENDING`] appends wait at once; past that (a flood of bad keys
//! outrunning the disk) events are dropped and counted, so that the flood
//! costs neither memory nor latency. A failed or dropped append is logged
//! with `tracing` and counted in [`failures`].
//!
//! Failed authentications have no tenant, so no tenant's admin sees them
//! through the API; an operator reads them with `berth audit --offline`.

use crate::auth::Auth;
use crate::error::ApiError;
use crate::AppState;
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::Json;
use berth_core::Principal;
use berth_log::{AuditDraft, AuditFilter, AuditOutcome, SessionRecord, VersionRecord};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Semaphore;

/// Audit appends that may be in flight at once.
pub const MAX_PENDING: usize = 1024;

/// The most events one `GET /v1/audit` returns.
const PAGE_MAX: usize = 1000;

static PENDING: Semaphore = Semaphore::const_new(MAX_PENDING);
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Audit events lost (dropped under load or failed to store) since start.
pub fn failures() -> u64 {
    FAILURES.load(Ordering::Relaxed)
}

/// Stores `draft` in the background.
pub fn record(state: &AppState, draft: AuditDraft) {
    let Ok(permit) = PENDING.try_acquire() else {
        lost(&draft, "too many audit events pending");
        return;
    };
    let store = state.store.clone();
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = store.append_audit(draft.clone()).await {
            lost(&draft, &e.to_string());
        }
    });
}

fn lost(draft: &AuditDraft, error: &str) {
    let lost = FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::warn!(action = %draft.action, error, lost, "audit event not stored");
}

/// The remote address, when the server was set up to record it.
fn source(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string())
}

/// A request whose credential was refused. The target is the path only:
/// the query string may carry anything.
pub fn refused(state: &AppState, parts: &Parts, reason: &str) {
    record(
        state,
        AuditDraft {
            tenant: None,
            user: None,
            action: "auth.refused".to_owned(),
            target: Some(parts.uri.path().to_owned()),
            outcome: AuditOutcome::Denied,
            reason: Some(reason.to_owned()),
            source: source(parts),
        },
    );
}

/// An authenticated principal refused an action on `target`.
pub fn denied(state: &AppState, who: &Principal, target: &str, reason: &str) {
    record(
        state,
        draft(
            who,
            "access.denied",
            target,
            AuditOutcome::Denied,
            Some(reason),
        ),
    );
}

/// An admin action that was carried out.
pub fn allowed(state: &AppState, who: &Principal, action: &str, target: &str) {
    record(
        state,
        draft(who, action, target, AuditOutcome::Allowed, None),
    );
}

/// The end of a deploy: the agent and version, or why it failed.
pub fn deployed(state: &AppState, who: &Principal, result: &Result<VersionRecord, ApiError>) {
    let (target, reason) = match result {
        Ok(v) => (format!("{}@{}", v.agent, v.version), None),
        Err(e) => (String::new(), Some(format!("failed: {}", e.code))),
    };
    let d = draft(
        who,
        "agent.deploy",
        &target,
        AuditOutcome::Allowed,
        reason.as_deref(),
    );
    record(state, d);
}

/// A session stop; audited when the caller stopped someone else's session
/// (an admin of the tenant), since stopping one's own is no admin action.
pub fn stopped(state: &AppState, who: &Principal, session: &SessionRecord) {
    if &session.user != who.user() || &session.tenant != who.tenant() {
        allowed(state, who, "session.stop", session.id.as_str());
    }
}

fn draft(
    who: &Principal,
    action: &str,
    target: &str,
    outcome: AuditOutcome,
    reason: Option<&str>,
) -> AuditDraft {
    AuditDraft {
        tenant: Some(who.tenant().clone()),
        user: Some(who.user().clone()),
        action: action.to_owned(),
        target: (!target.is_empty()).then(|| target.to_owned()),
        outcome,
        reason: reason.map(str::to_owned),
        source: None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    action: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/audit`: the events of the caller's tenant, oldest first, for
/// admins.
pub async fn list(
    State(s): State<AppState>,
    auth: Auth,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    auth.require_admin(&s, "/v1/audit")?;
    let filter = AuditFilter {
        tenant: Some(auth.0.tenant().clone()),
        action: q.action,
        after: q.after.unwrap_or(0),
        limit: q.limit.unwrap_or(PAGE_MAX).clamp(1, PAGE_MAX),
    };
    let events = s.store.list_audit(filter).await?;
    Ok(Json(serde_json::json!({ "events": events })))
}
