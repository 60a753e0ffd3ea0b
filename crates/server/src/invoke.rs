//! Invocations: `POST /v1/agents/{agent}/invocations` and the AgentCore
//! data-plane shape `POST /runtimes/{arn}/invocations`.

use crate::agents::{parse_agent, resolve};
use crate::auth::Auth;
use crate::error::ApiError;
use crate::metrics::StatusLabel;
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_core::{AgentName, RequestId, SessionId};
use berth_session::{AgentSpec, Invocation};
use http_body_util::BodyExt;
use std::time::Instant;

pub const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";
pub const REQUEST_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-request-id";
/// Headers every agent receives when the caller sends them.
const PASSED: [&str; 5] = [
    "content-type",
    "accept",
    "traceparent",
    "tracestate",
    "baggage",
];
const MAX_CUSTOM_HEADERS: usize = 20;
const MAX_CUSTOM_VALUE: usize = 4096;
/// Hop-by-hop headers never relayed from the agent.
const HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-connection",
];

#[derive(serde::Deserialize)]
pub struct Qualifier {
    qualifier: Option<String>,
}

pub async fn v1(
    State(s): State<AppState>,
    auth: Auth,
    Path(agent): Path<String>,
    Query(q): Query<Qualifier>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = parse_agent(&agent)?;
    handle(s, auth, agent, q.qualifier, headers, body).await
}

pub async fn agentcore(
    State(s): State<AppState>,
    auth: Auth,
    Path(arn): Path<String>,
    Query(q): Query<Qualifier>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let agent = agent_from_arn(&arn)?;
    handle(s, auth, agent, q.qualifier, headers, body).await
}

/// `arn:aws:bedrock-agentcore:REGION:ACCOUNT:runtime/NAME` names NAME; a
/// plain agent name is accepted as well.
pub fn agent_from_arn(raw: &str) -> Result<AgentName, ApiError> {
    if let Some(rest) = raw.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        let name = match parts.as_slice() {
            [_, "bedrock-agentcore", _, _, res] => res.strip_prefix("runtime/"),
            _ => None,
        };
        let name = name.ok_or_else(|| {
            ApiError::bad_request(
                "invalid_arn",
                "expected arn:aws:bedrock-agentcore:REGION:ACCOUNT:runtime/NAME",
            )
        })?;
        return parse_agent(name);
    }
    parse_agent(raw)
}

pub fn session_id(headers: &HeaderMap) -> Result<SessionId, ApiError> {
    match headers.get(SESSION_HEADER) {
        None => Ok(SessionId::generate()),
        Some(v) => {
            let s = v.to_str().map_err(|_| {
                ApiError::bad_request("invalid_session_id", "session id must be ASCII")
            })?;
            SessionId::parse(s)
                .map_err(|e| ApiError::bad_request("invalid_session_id", e.to_string()))
        }
    }
}

pub const USER_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-user-id";

/// The principal a request acts as: the caller, or the user it names in
/// the user-id header when its role allows acting for users.
fn acting_principal(
    who: berth_core::Principal,
    headers: &HeaderMap,
) -> Result<berth_core::Principal, ApiError> {
    let Some(v) = headers.get(USER_HEADER) else {
        return Ok(who);
    };
    let user = v
        .to_str()
        .ok()
        .and_then(|u| berth_core::UserId::parse(u).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_user_id",
                "the user id header is not a valid user id",
            )
        })?;
    who.act_for(user)
        .ok_or_else(|| ApiError::forbidden("this principal may not act for other users"))
}

async fn handle(
    s: AppState,
    Auth(who): Auth,
    agent: AgentName,
    qualifier: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let who = acting_principal(who, &headers)?;
    let sid = session_id(&headers)?;
    let spec = resolve(&s, &agent, qualifier.as_deref()).await?;
    let payload = read_body(&s, &headers, body).await?;
    let request_id = RequestId::generate();
    let req = agent_request(&spec, &headers, &sid, &request_id, payload)?;
    let bytes_in = req.1;
    let inv = Invocation {
        request_id,
        request: req.0,
        bytes_in,
    };
    let result = s.sessions.invoke(&who, sid.clone(), &spec, inv).await;
    s.metrics
        .invocation_seconds
        .observe(started.elapsed().as_secs_f64());
    let resp = match result {
        Ok(r) => relay(r, &sid),
        Err(e) => {
            let mut r = ApiError::from(e).into_response();
            if let Ok(v) = HeaderValue::from_str(sid.as_str()) {
                r.headers_mut().insert(SESSION_HEADER, v);
            }
            r
        }
    };
    s.metrics
        .invocations
        .get_or_create(&StatusLabel {
            status: resp.status().as_u16(),
        })
        .inc();
    Ok(resp)
}

/// Reads the payload within the body limit. Invocation bodies are the
/// agent's business: they pass through byte for byte.
async fn read_body(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, ApiError> {
    let limit = s.cfg.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limit as usize);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(ApiError::bad_request(
            "body_read_failed",
            "the request body could not be read",
        )),
    }
}

/// Builds the request the agent sees (CONTRACTS.md §1).
fn agent_request(
    spec: &AgentSpec,
    headers: &HeaderMap,
    sid: &SessionId,
    rid: &RequestId,
    payload: bytes::Bytes,
) -> Result<(http::Request<berth_sandbox::BoxBody>, u64), ApiError> {
    let mut out = HeaderMap::new();
    for name in PASSED {
        if let Some(v) = headers.get(name) {
            out.insert(name, v.clone());
        }
    }
    let policy = &spec.manifest.headers;
    if policy.authorization {
        if let Some(v) = headers.get(http::header::AUTHORIZATION) {
            out.insert(http::header::AUTHORIZATION, v.clone());
        }
    }
    let mut custom = 0;
    for (name, v) in headers {
        let n = name.as_str();
        let allowed = policy.allows(n);
        if !allowed {
            continue;
        }
        custom += 1;
        if custom > MAX_CUSTOM_HEADERS || v.len() > MAX_CUSTOM_VALUE {
            return Err(ApiError::bad_request(
                "custom_headers_over_limit",
                format!("at most {MAX_CUSTOM_HEADERS} custom headers of at most {MAX_CUSTOM_VALUE} bytes each"),
            ));
        }
        out.append(name.clone(), v.clone());
    }
    // Present only when `acting_principal` honoured it.
    if let Some(v) = headers.get(USER_HEADER) {
        out.insert(HeaderName::from_static(USER_HEADER), v.clone());
    }
    let hv = |s: &str| HeaderValue::from_str(s).map_err(ApiError::internal);
    out.insert(HeaderName::from_static(SESSION_HEADER), hv(sid.as_str())?);
    out.insert(HeaderName::from_static(REQUEST_HEADER), hv(rid.as_str())?);
    let len = payload.len() as u64;
    let body = http_body_util::Full::new(payload)
        .map_err(|never| match never {})
        .boxed();
    let mut req = http::Request::post("/invocations")
        .body(body)
        .map_err(ApiError::internal)?;
    *req.headers_mut() = out;
    Ok((req, len))
}

/// Streams the agent's response back, chunk by chunk.
fn relay(resp: http::Response<berth_session::TurnBody>, sid: &SessionId) -> Response {
    let (parts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    for (name, v) in &parts.headers {
        if !HOP.contains(&name.as_str()) {
            out.headers_mut().append(name.clone(), v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(sid.as_str()) {
        out.headers_mut().insert(SESSION_HEADER, v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns_name_agents() {
        let a = agent_from_arn("arn:aws:bedrock-agentcore:us-east-1:123456789012:runtime/echo")
            .unwrap();
        assert_eq!(a.as_str(), "echo");
        assert_eq!(agent_from_arn("echo").unwrap().as_str(), "echo");
        assert!(agent_from_arn("arn:aws:s3:::bucket").is_err());
        assert!(agent_from_arn("arn:aws:bedrock-agentcore:r:a:runtime/Bad Name").is_err());
    }

    #[test]
    fn session_ids_from_headers() {
        let mut h = HeaderMap::new();
        assert!(session_id(&h).is_ok());
        h.insert(SESSION_HEADER, HeaderValue::from_static("short"));
        assert!(session_id(&h).is_err());
        h.insert(
            SESSION_HEADER,
            HeaderValue::from_str(&"a".repeat(40)).unwrap(),
        );
        assert_eq!(session_id(&h).unwrap().as_str(), "a".repeat(40));
    }
}
