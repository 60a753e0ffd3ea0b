//! Running the server: open the store, recover from a crash, serve HTTP
//! with bounded heads, bodies and connections, and shut down gracefully.

use crate::agents::AgentCache;
use crate::config::Config;
use crate::deploy::DeployConfig;
use crate::metrics::Metrics;
use crate::{app, dev, AppState};
use axum::response::{IntoResponse, Response};
use berth_core::manifest::ManifestPolicy;
use berth_session::{SessionConfig, SessionManager};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(#[from] berth_log::LogError),
    #[error("cannot start the sandbox driver: {0}")]
    Driver(#[from] berth_sandbox::DriverError),
    #[error("start-up recovery failed: {0}")]
    Recovery(#[from] berth_session::SessionError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("authentication setup failed: {0}")]
    Auth(String),
    #[error("dev setup failed: {0}")]
    Dev(String),
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
}

fn mkdir(path: &std::path::Path) -> Result<(), ServerError> {
    std::fs::create_dir_all(path).map_err(|source| ServerError::DataDir {
        path: path.to_owned(),
        source,
    })
}

async fn build_state(cfg: Config) -> Result<AppState, ServerError> {
    cfg.validate()?;
    let data = std::path::absolute(&cfg.data_dir).map_err(|source| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    mkdir(&data)?;
    mkdir(&data.join("agents"))?;
    let store = Arc::new(berth_log::SqliteLog::open(&data.join("berth.db"))?);
    let substrates = crate::substrates::build(&cfg, &data).await?;
    let workload = crate::workload::WorkloadTokenService::open(
        &data.join("workload-keys"),
        cfg.workload_token_ttl_s,
        cfg.workload_key_rotation_s,
    )
    .map_err(|e| ServerError::Auth(e.to_string()))?;
    workload.spawn_rotation();
    let scfg = SessionConfig {
        queue_depth: cfg.queue_depth,
        max_live_sessions: cfg.max_live_sessions,
        ping_interval: Duration::from_millis(cfg.ping_interval_ms),
        stop_grace: Duration::from_secs(cfg.stop_grace_s),
        aws_region: cfg.aws_region.clone(),
        quotas: cfg.quotas.to_session(),
        tokens: Some(workload.clone()),
        isolation: cfg.isolation.clone(),
        ..SessionConfig::default()
    };
    let sessions = SessionManager::new(store.clone(), substrates, scfg);
    let report = sessions.recover().await?;
    tracing::info!(closed = report.closed_sessions, sweep = ?report.sweep, "recovered");
    let mut deploy = DeployConfig::new(data.join("agents"));
    deploy.python = cfg.python.clone();
    deploy.max_archive_bytes = cfg.max_body_bytes;
    deploy.policy = ManifestPolicy {
        min_lifetime_s: cfg.min_lifetime_s,
        ..ManifestPolicy::default()
    };
    let oidc = match &cfg.oidc {
        Some(o) => Some(Arc::new(
            crate::auth::oidc::OidcVerifier::new(o.clone())
                .map_err(|e| ServerError::Auth(e.to_string()))?,
        )),
        None => None,
    };
    let master = crate::auth::sigv4::load_or_create_master(&data)
        .map_err(|e| ServerError::Auth(format!("SigV4 master key: {e}")))?;
    let sigv4 = Arc::new(crate::auth::sigv4::SigV4Verifier::new(
        store.clone(),
        master,
        crate::auth::sigv4::SigV4Config::default(),
    ));
    let mut cfg = cfg;
    cfg.data_dir = data;
    Ok(AppState {
        oidc,
        sigv4,
        workload,
        store,
        sessions,
        cfg: Arc::new(cfg),
        deploy: Arc::new(deploy),
        agents: Arc::new(AgentCache::default()),
        metrics: Arc::new(Metrics::default()),
    })
}

/// Runs berth until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), ServerError> {
    let state = build_state(cfg).await?;
    let cfg = state.cfg.clone();
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: cfg.listen,
            source,
        })?;
    // Scripts and tests read the bound address from this line.
    println!("berth listening on http://{addr}");
    if cfg.dev {
        dev::setup(&state, addr).await.map_err(ServerError::Dev)?;
    }
    let router = app(state.clone()).layer(axum::middleware::map_response(json_errors));
    serve(listener, router, &cfg).await;
    tracing::info!("stopping every session");
    state.sessions.shutdown().await;
    Ok(())
}

async fn serve(listener: TcpListener, router: axum::Router, cfg: &Config) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(cfg.max_header_bytes)
        .header_read_timeout(cfg.header_timeout())
        .timer(TokioTimer::new());
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        let (stream, _) = tokio::select! {
            acc = listener.accept() => match acc {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        // Past the connection limit new connections are closed at once.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(10)) => {
            tracing::warn!("connections still open after 10 s; closing");
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// axum's own rejections (bad query, bad path, wrong method, body limit)
/// answer in plain text; every error of the API is JSON with a code.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_text = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !is_text {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let code = match status.as_u16() {
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 | 400 => "bad_request",
        _ => "error",
    };
    let message = String::from_utf8_lossy(&bytes).trim().to_owned();
    let message = if message.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        message
    };
    let mut out = crate::error::ApiError::new(status, code, message).into_response();
    if let Some(allow) = parts.headers.get(http::header::ALLOW) {
        out.headers_mut().insert(http::header::ALLOW, allow.clone());
    }
    out
}
