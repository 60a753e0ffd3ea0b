//! After setup, pid 1 of the sandbox: starts the agent, reaps every child,
//! forwards SIGTERM, and serves HTTP/2 on the channel, relaying requests to
//! the agent over HTTP/1 on loopback.

use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::proto::{GuestSpec, GuestStatus, RESERVED_PREFIX, SHUTDOWN_PATH, STATUS_PATH};
use crate::sys;

type Body = BoxBody<Bytes, hyper::Error>;

/// How long the guest keeps answering after the agent exited on its own,
/// so the host can still read the final status.
pub(crate) const LINGER: Duration = Duration::from_millis(200);
/// Default grace between SIGTERM and SIGKILL on shutdown.
const DEFAULT_GRACE: Duration = Duration::from_secs(5);

pub(crate) struct Shared {
    agent: Pid,
    status: watch::Receiver<GuestStatus>,
    shutdown: AtomicBool,
    client: Client<HttpConnector, Incoming>,
    port: u16,
}

/// SIGCHLD and SIGTERM handlers; installed before the agent exists so that
/// no exit is missed.
pub(crate) struct Signals {
    sigchld: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> std::io::Result<Self> {
        Ok(Signals {
            sigchld: signal(SignalKind::child())?,
            sigterm: signal(SignalKind::terminate())?,
        })
    }
}

impl Shared {
    /// Supervises `agent`: reaps children, forwards SIGTERM, and publishes
    /// the agent's status.
    pub(crate) fn start(signals: Signals, agent: Pid, port: u16) -> Arc<Shared> {
        let (tx, rx) = watch::channel(GuestStatus {
            agent_pid: Some(agent.as_raw()),
            running: true,
            ..GuestStatus::default()
        });
        tokio::spawn(reap(signals.sigchld, agent, tx));
        tokio::spawn(forward_sigterm(signals.sigterm, agent));
        Arc::new(Shared {
            agent,
            status: rx,
            shutdown: AtomicBool::new(false),
            client: Client::builder(TokioExecutor::new()).build(agent_connector()),
            port,
        })
    }

    pub(crate) fn status(&self) -> watch::Receiver<GuestStatus> {
        self.status.clone()
    }

    /// True when the agent answers GET /ping with 200.
    pub(crate) async fn ping(&self) -> bool {
        let client: Client<HttpConnector, http_body_util::Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(agent_connector());
        let Ok(uri) = format!("http://127.0.0.1:{}/ping", self.port).parse::<http::Uri>() else {
            return false;
        };
        match client.get(uri).await {
            Ok(resp) => {
                let ok = resp.status() == StatusCode::OK;
                let _ = resp.into_body().collect().await;
                ok
            }
            Err(_) => false,
        }
    }

    /// True once the host asked for a shutdown.
    pub(crate) fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

/// The exit code the guest reports for the agent's final status.
pub(crate) fn exit_code(last: &GuestStatus) -> i32 {
    last.exit_code.or(last.signal.map(|s| 128 + s)).unwrap_or(1)
}

/// Runs until the agent exits (returns its exit code) or the host hangs up.
pub fn run(spec: &GuestSpec) -> i32 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        // Exit from inside the runtime: dropping it would wait for its
        // blocking threads, which only delays the host seeing the end.
        Ok(rt) => std::process::exit(rt.block_on(serve(spec))),
        Err(e) => {
            eprintln!("berth-guest: runtime: {e}");
            70
        }
    }
}

async fn serve(spec: &GuestSpec) -> i32 {
    let Ok(signals) = Signals::install() else {
        eprintln!("berth-guest: cannot install signal handlers");
        return 70;
    };
    let spawned = agent_command(&spec.entrypoint, &spec.env, spec.venv_dir.is_some())
        .and_then(|mut cmd| spawn(&mut cmd));
    let agent = match spawned {
        Ok(pid) => pid,
        Err(e) => {
            eprintln!("berth-guest: cannot start agent {:?}: {e}", spec.entrypoint);
            return 127;
        }
    };
    let shared = Shared::start(signals, agent, spec.agent_port);
    let rx = shared.status();
    wait_for_end(shared, rx).await
}

async fn wait_for_end(shared: Arc<Shared>, mut status: watch::Receiver<GuestStatus>) -> i32 {
    let stream = match channel() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth-guest: channel: {e}");
            return 70;
        }
    };
    let mut conn = tokio::spawn(serve_channel(stream, shared.clone()));
    tokio::select! {
        _ = &mut conn => {
            // The host hung up: nobody can reach this sandbox any more.
            let _ = kill(shared.agent, Signal::SIGKILL);
            return 137;
        }
        _ = status.wait_for(|s| !s.running) => {}
    }
    if !shared.shutdown.load(Ordering::SeqCst) {
        let _ = tokio::time::timeout(LINGER, conn).await;
    }
    let last = *status.borrow();
    exit_code(&last)
}

fn channel() -> std::io::Result<tokio::net::UnixStream> {
    let stream = sys::channel_stream();
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// The agent's command line, cwd `/app`, and a clean environment.
pub(crate) fn agent_command(
    entrypoint: &[String],
    env: &[(String, String)],
    venv: bool,
) -> std::io::Result<Command> {
    let (program, args) = entrypoint
        .split_first()
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    let path = match venv {
        true => "/venv/bin:/usr/local/bin:/usr/bin:/bin",
        false => "/usr/local/bin:/usr/bin:/bin",
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir("/app")
        .env_clear()
        .env("PATH", path)
        .env("HOME", "/tmp")
        .env("TMPDIR", "/tmp")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    Ok(cmd)
}

pub(crate) fn spawn(cmd: &mut Command) -> std::io::Result<Pid> {
    let child = cmd.spawn()?;
    // The child is reaped by `reap` through waitpid(-1); the std handle is
    // dropped without waiting, which neither kills nor reaps it.
    Ok(Pid::from_raw(child.id() as i32))
}

/// Pid 1 reaps every child, orphans included, and records the agent's end.
async fn reap(
    mut sigchld: tokio::signal::unix::Signal,
    agent: Pid,
    tx: watch::Sender<GuestStatus>,
) {
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == agent => tx.send_modify(|s| {
                    s.running = false;
                    s.exit_code = Some(code);
                }),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => tx.send_modify(|s| {
                    s.running = false;
                    s.signal = Some(sig as i32);
                }),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}

async fn forward_sigterm(mut sigterm: tokio::signal::unix::Signal, agent: Pid) {
    while sigterm.recv().await.is_some() {
        let _ = kill(agent, Signal::SIGTERM);
    }
}

/// Serves HTTP/2 on `stream` until the host hangs up.
pub(crate) async fn serve_channel<IO>(stream: IO, shared: Arc<Shared>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(shared.clone(), req));
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(4096)
        .max_header_list_size(256 * 1024);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        eprintln!("berth-guest: channel closed: {e}");
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let response = if path == STATUS_PATH && req.method() == Method::GET {
        json(StatusCode::OK, &*shared.status.borrow())
    } else if path == SHUTDOWN_PATH && req.method() == Method::POST {
        shutdown(&shared, grace_from_query(req.uri().query()));
        json(StatusCode::ACCEPTED, &*shared.status.borrow())
    } else if path.starts_with(RESERVED_PREFIX) {
        error(StatusCode::NOT_FOUND, "not_found", "no such guest endpoint")
    } else {
        forward(&shared, req).await
    };
    Ok(response)
}

fn grace_from_query(query: Option<&str>) -> Duration {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("grace_ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_GRACE)
}

/// SIGTERM now, SIGKILL after `grace` if the agent is still running.
fn shutdown(shared: &Arc<Shared>, grace: Duration) {
    if shared.shutdown.swap(true, Ordering::SeqCst) {
        return;
    }
    let _ = kill(shared.agent, Signal::SIGTERM);
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        if shared.status.borrow().running {
            let _ = kill(shared.agent, Signal::SIGKILL);
        }
    });
}

async fn forward(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://127.0.0.1:{}{pq}", shared.port).parse() else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid request target",
        );
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    match shared
        .client
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(GUEST_ERROR_HEADER);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            let message = format!("agent not reachable on port {}: {e}", shared.port);
            error(StatusCode::BAD_GATEWAY, "agent_unreachable", &message)
        }
    }
}

/// Connection-level headers belong to one hop and are illegal in HTTP/2.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Connections to the agent. Nagle's algorithm would hold back the body
/// written after the head until the agent's delayed ACK (~40 ms a turn).
fn agent_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Marks the guest's own answers, so the host can tell them from the
/// agent's; the agent's responses never carry it (see `forward`).
pub const GUEST_ERROR_HEADER: &str = "x-berth-guest-error";

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut r = json(
        status,
        &serde_json::json!({ "code": code, "message": message }),
    );
    if let Ok(v) = header::HeaderValue::from_str(code) {
        r.headers_mut().insert(GUEST_ERROR_HEADER, v);
    }
    r
}
