//! Agents and versions: deploy, list, show, delete; and the resolution of
//! an agent name and qualifier to a runnable version.

use crate::auth::Auth;
use crate::deploy;
use crate::error::ApiError;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_core::manifest::Manifest;
use berth_core::AgentName;
use berth_log::VersionRecord;
use berth_session::AgentSpec;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Resolved DEFAULT versions, so a warm turn does not read the catalog.
/// Deploys and deletes invalidate the agent's entry.
#[derive(Default)]
pub struct AgentCache {
    latest: Mutex<HashMap<AgentName, Arc<AgentSpec>>>,
}

impl AgentCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentName, Arc<AgentSpec>>> {
        // Entries are whole values; a poisoned lock holds nothing half-written.
        self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn invalidate(&self, agent: &AgentName) {
        self.lock().remove(agent);
    }
}

fn spec_of(v: &VersionRecord) -> Result<AgentSpec, ApiError> {
    let manifest: Manifest = serde_json::from_str(&v.manifest_json).map_err(ApiError::internal)?;
    let dir = std::path::PathBuf::from(&v.dir);
    let venv = dir.join("venv");
    Ok(AgentSpec {
        name: v.agent.clone(),
        version: v.version,
        manifest,
        app_dir: dir.join("app"),
        venv_dir: venv.is_dir().then_some(venv),
    })
}

/// The version `qualifier` names: `DEFAULT` (or none) is the newest.
pub async fn resolve(
    state: &AppState,
    agent: &AgentName,
    qualifier: Option<&str>,
) -> Result<Arc<AgentSpec>, ApiError> {
    let unknown = || ApiError::not_found(&format!("agent {agent}"));
    match qualifier {
        None | Some("") | Some("DEFAULT") => {
            if let Some(spec) = state.agents.lock().get(agent) {
                return Ok(spec.clone());
            }
            let v = state
                .store
                .latest_version(agent)
                .await?
                .ok_or_else(unknown)?;
            let spec = Arc::new(spec_of(&v)?);
            state.agents.lock().insert(agent.clone(), spec.clone());
            Ok(spec)
        }
        Some(q) => {
            let n: u64 = q.parse().map_err(|_| {
                ApiError::bad_request(
                    "invalid_qualifier",
                    "qualifier must be DEFAULT or a version number",
                )
            })?;
            let v = state
                .store
                .version(agent, n)
                .await?
                .ok_or_else(|| ApiError::not_found(&format!("version {n} of agent {agent}")))?;
            Ok(Arc::new(spec_of(&v)?))
        }
    }
}

pub fn parse_agent(raw: &str) -> Result<AgentName, ApiError> {
    AgentName::parse(raw).map_err(|e| ApiError::bad_request("invalid_agent_name", e.to_string()))
}

pub async fn list(
    State(s): State<AppState>,
    _auth: Auth,
) -> Result<Json<serde_json::Value>, ApiError> {
    let agents = s.store.list_agents().await?;
    Ok(Json(serde_json::json!({ "agents": agents })))
}

pub async fn show(
    State(s): State<AppState>,
    _auth: Auth,
    Path(agent): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = parse_agent(&agent)?;
    let rec = s
        .store
        .agent(&name)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("agent {name}")))?;
    let versions = s.store.versions(&name).await?;
    Ok(Json(
        serde_json::json!({ "agent": rec, "versions": versions }),
    ))
}

pub async fn remove(
    State(s): State<AppState>,
    auth: Auth,
    Path(agent): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require_admin(&s, &agent)?;
    let name = parse_agent(&agent)?;
    let versions = s.store.versions(&name).await?;
    if !s.store.delete_agent(&name).await? {
        return Err(ApiError::not_found(&format!("agent {name}")));
    }
    s.agents.invalidate(&name);
    crate::audit::allowed(&s, &auth.0, "agent.delete", name.as_str());
    for v in versions {
        deploy::remove(std::path::Path::new(&v.dir)).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_version(
    State(s): State<AppState>,
    auth: Auth,
    Path((agent, version)): Path<(String, u64)>,
) -> Result<StatusCode, ApiError> {
    auth.require_admin(&s, &format!("{agent}@{version}"))?;
    let name = parse_agent(&agent)?;
    let v = s.store.version(&name, version).await?;
    let found = v.is_some() && s.store.delete_version(&name, version).await?;
    if !found {
        return Err(ApiError::not_found(&format!(
            "version {version} of agent {name}"
        )));
    }
    s.agents.invalidate(&name);
    crate::audit::allowed(
        &s,
        &auth.0,
        "agent.version.delete",
        &format!("{name}@{version}"),
    );
    if let Some(v) = v {
        deploy::remove(std::path::Path::new(&v.dir)).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Installs an uploaded archive as a new version, streaming progress as
/// NDJSON lines: `{"progress": ...}` then `{"version": ...}` or `{"error": ...}`.
pub async fn deploy(
    State(s): State<AppState>,
    auth: Auth,
    body: Bytes,
) -> Result<Response, ApiError> {
    auth.require_admin(&s, "agent deploy")?;
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    let relay = out_tx.clone();
    tokio::spawn(async move {
        let mut rx = rx;
        while let Some(line) = rx.recv().await {
            let json = serde_json::json!({ "progress": line }).to_string() + "\n";
            if relay.send(Ok(json)).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let result = install(&s, Some(auth.0.tenant()), &body, tx).await;
        crate::audit::deployed(&s, &auth.0, &result);
        let last = match result {
            Ok(v) => serde_json::json!({ "version": v }),
            Err(e) => serde_json::json!({ "error": { "code": e.code, "message": e.message } }),
        };
        // Let the progress relay drain first so the final line comes last.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let _ = out_tx.send(Ok(last.to_string() + "\n")).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(out_rx);
    Ok((
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Installs an archive as a new version of its agent and records it.
pub async fn install(
    s: &AppState,
    tenant: Option<&berth_core::TenantId>,
    archive: &[u8],
    progress: tokio::sync::mpsc::Sender<String>,
) -> Result<VersionRecord, ApiError> {
    let installed = deploy::install(&s.deploy, archive, progress.clone())
        .await
        .map_err(|e| ApiError::bad_request(e.code(), e.to_string()))?;
    // The substrate must run here (and suit the deployer's tenant) before
    // the version exists; its per-version work (images, a snapshot
    // template) is done now so the first session does not wait for it.
    let agent = berth_session::AgentSpec {
        name: installed.manifest.name.clone(),
        version: 0,
        manifest: installed.manifest.clone(),
        app_dir: installed.app_dir.clone(),
        venv_dir: installed.venv_dir.clone(),
    };
    let report = progress.clone();
    let say = move |line: &str| {
        let _ = report.try_send(line.to_owned());
    };
    if let Err(e) = s.sessions.prepare(tenant, &agent, &say).await {
        deploy::remove(&installed.dir).await;
        return Err(match e {
            berth_session::SessionError::SubstrateUnavailable(e) => {
                ApiError::bad_request("substrate_unavailable", e.to_string())
            }
            e @ berth_session::SessionError::IsolationPolicy { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "isolation_policy", e.to_string())
            }
            e => ApiError::bad_request("substrate_prepare_failed", e.to_string()),
        });
    }
    let manifest_json = serde_json::to_string(&installed.manifest).map_err(ApiError::internal)?;
    let dir = installed.dir.to_string_lossy().into_owned();
    let v = s
        .store
        .create_version(&installed.manifest.name, &manifest_json, &dir)
        .await?;
    s.agents.invalidate(&installed.manifest.name);
    Ok(v)
}
