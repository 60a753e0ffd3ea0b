//! Sessions, their events (paged and as a stream), usage, and stopping.
//! Every handler goes through the session manager, which checks the owner.

use crate::auth::Auth;
use crate::error::ApiError;
use crate::invoke::{agent_from_arn, SESSION_HEADER};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use berth_core::{AgentName, EventRecord, Principal, SessionId, SessionStatus};
use berth_log::{SessionFilter, UsageFilter, UsageGroup};
use futures_util::Stream;
use serde::Deserialize;
use std::collections::VecDeque;
use std::convert::Infallible;

const PAGE_MAX: usize = 1000;

fn parse_session(raw: &str) -> Result<SessionId, ApiError> {
    // A malformed id can name no session; answer like any missing one
    // would be answered for a well-formed id, but say what is wrong.
    SessionId::parse(raw).map_err(|e| ApiError::bad_request("invalid_session_id", e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    agent: Option<String>,
    status: Option<String>,
    user: Option<String>,
    limit: Option<usize>,
}

pub async fn list(
    State(s): State<AppState>,
    Auth(who): Auth,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(v) => Some(SessionStatus::parse(v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_status",
                "status must be provisioning, active, idle or terminated",
            )
        })?),
    };
    let filter = SessionFilter {
        agent: q.agent.as_deref().map(AgentName::parse).transpose()?,
        user: q
            .user
            .as_deref()
            .map(berth_core::UserId::parse)
            .transpose()?,
        status,
        limit: q.limit.unwrap_or(PAGE_MAX).min(PAGE_MAX),
        ..Default::default()
    };
    let sessions = s.sessions.list(&who, filter).await?;
    Ok(Json(serde_json::json!({ "sessions": sessions })))
}

pub async fn show(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<berth_log::SessionRecord>, ApiError> {
    let id = parse_session(&id)?;
    Ok(Json(s.sessions.get(&who, &id).await?))
}

pub async fn stop(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
) -> Result<Json<berth_log::SessionRecord>, ApiError> {
    let id = parse_session(&id)?;
    let rec = s.sessions.stop(&who, &id).await?;
    crate::audit::stopped(&s, &who, &rec);
    Ok(Json(rec))
}

/// AgentCore's `StopRuntimeSession`: the session id comes in its header.
pub async fn agentcore_stop(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(arn): Path<String>,
    headers: HeaderMap,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let agent = agent_from_arn(&arn)?;
    let raw = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::bad_request("invalid_session_id", "the session id header is required")
        })?;
    let id = parse_session(raw)?;
    let rec = s.sessions.get(&who, &id).await?;
    if rec.agent != agent {
        return Err(ApiError::session_not_found());
    }
    let rec = s.sessions.stop(&who, &id).await?;
    crate::audit::stopped(&s, &who, &rec);
    // boto3 reads the session id back from the header, as for invocations.
    let echo = [(SESSION_HEADER, rec.id.to_string())];
    Ok((
        echo,
        Json(serde_json::json!({ "runtimeSessionId": rec.id, "statusCode": 200 })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

pub async fn events(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_session(&id)?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(PAGE_MAX).clamp(1, PAGE_MAX);
    let events = s.sessions.events(&who, &id, after, limit).await?;
    let next = events.last().map_or(after, |e| e.seq);
    Ok(Json(serde_json::json!({ "events": events, "next": next })))
}

/// The cursor of a stream: `?after=N`, else `Last-Event-ID`, else 0.
fn cursor(q: &EventsQuery, headers: &HeaderMap) -> u64 {
    q.after
        .or_else(|| {
            headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Follow {
    s: AppState,
    who: Principal,
    id: SessionId,
    after: u64,
    buf: VecDeque<EventRecord>,
    wake: tokio::sync::broadcast::Receiver<SessionId>,
}

impl Follow {
    /// The next event after the cursor. It subscribes before it reads, so
    /// an append between the read and the wait still wakes it: no event
    /// is ever skipped.
    async fn next(&mut self) -> Option<EventRecord> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                self.after = ev.seq;
                return Some(ev);
            }
            let page = self
                .s
                .sessions
                .events(&self.who, &self.id, self.after, PAGE_MAX)
                .await
                .ok()?;
            if !page.is_empty() {
                self.buf.extend(page);
                continue;
            }
            loop {
                match self.wake.recv().await {
                    Ok(id) if id == self.id => break,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    }
}

pub async fn stream(
    State(s): State<AppState>,
    Auth(who): Auth,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = parse_session(&id)?;
    let wake = s.sessions.subscribe();
    // Checks the owner before the first byte of the stream.
    s.sessions.get(&who, &id).await?;
    let follow = Follow {
        after: cursor(&q, &headers),
        s,
        who,
        id,
        buf: VecDeque::new(),
        wake,
    };
    let events = futures_util::stream::unfold(follow, |mut f| async move {
        let ev = f.next().await?;
        let data = serde_json::to_string(&ev).unwrap_or_default();
        let event = Event::default()
            .id(ev.seq.to_string())
            .event(ev.event.kind())
            .data(data);
        Some((Ok(event), f))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    group_by: Option<UsageGroup>,
    agent: Option<String>,
    session: Option<String>,
    user: Option<String>,
}

pub async fn usage(
    State(s): State<AppState>,
    Auth(who): Auth,
    Query(q): Query<UsageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = UsageFilter {
        agent: q.agent.as_deref().map(AgentName::parse).transpose()?,
        session: q.session.as_deref().map(SessionId::parse).transpose()?,
        user: q
            .user
            .as_deref()
            .map(berth_core::UserId::parse)
            .transpose()?,
        ..Default::default()
    };
    let group = q.group_by.unwrap_or(UsageGroup::Session);
    let rows = s.sessions.usage(&who, group, filter).await?;
    Ok(Json(serde_json::json!({ "usage": rows })))
}
