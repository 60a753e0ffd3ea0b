//! berth-sandbox: the `Driver` trait and its substrates.
//!
//! A driver turns a [`SandboxSpec`] into a running [`Sandbox`]: an isolated
//! place where the agent runs, reachable only through the guest's channel.
//! This crate knows nothing of tenants, sessions or the log.

mod client;
mod error;
pub mod gvisor;
pub mod microvm;
pub mod probe;
pub mod process;
mod registry;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use http::{Request, Response};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

pub use berth_guest::proto::GuestStatus;
pub use client::{read_preamble, ChannelLimits, GuestClient};
pub use error::DriverError;
pub use registry::{Substrates, SUBSTRATES};

/// Request body type the sandbox accepts.
pub type BoxBody =
    http_body_util::combinators::BoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub vcpus: f64,
    pub memory_bytes: u64,
    pub pids: u64,
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique, `[a-z0-9-]{1,64}`; names the cgroup and the state directory.
    pub sandbox_id: String,
    /// The agent version's directory (read-only lower layer of `/app`).
    pub app_dir: PathBuf,
    /// Private Python environment, mounted read-only at `/venv`.
    pub venv_dir: Option<PathBuf>,
    /// Command run with cwd `/app`, e.g. `["python3", "main.py"]`.
    pub entrypoint: Vec<String>,
    /// Extra environment for the agent.
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// Port the agent listens on inside the sandbox (8080).
    pub agent_port: u16,
    /// The session this sandbox serves; a substrate that clones sandboxes
    /// from a snapshot tells the guest after the restore.
    pub session_id: String,
    /// Whether the substrate may start this sandbox as a clone of a
    /// snapshot of an already started agent (`snapshot` in `berth.toml`).
    pub snapshot: bool,
}

/// Progress lines of a long preparation (image builds, template boots).
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Whether a substrate can run on this host, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubstrateReport {
    /// `process`, `gvisor` or `microvm`.
    pub substrate: String,
    pub available: bool,
    /// How it runs here (e.g. `tcg (software emulation)`), or why it cannot.
    pub detail: String,
}

/// Resource use read from the sandbox's cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SandboxUsage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub peak_memory_bytes: u64,
}

/// What `sweep` found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub processes_killed: usize,
    pub cgroups_removed: usize,
    pub mounts_removed: usize,
    pub state_dirs_removed: usize,
}

/// A substrate: creates sandboxes and cleans up after a crash.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Short name of the substrate, e.g. `"process"`.
    fn substrate(&self) -> &'static str;
    async fn start(&self, spec: SandboxSpec) -> Result<Sandbox, DriverError>;
    /// Work done once per agent version before its first session, at deploy
    /// time: building images, booting and snapshotting a template. `spec`
    /// is a sandbox spec of the version (its id and session are not used).
    /// Idempotent and cached; the default does nothing.
    async fn prepare(&self, spec: &SandboxSpec, progress: Progress<'_>) -> Result<(), DriverError> {
        let _ = (spec, progress);
        Ok(())
    }
    /// Removes what a crashed run left: processes, cgroups, mounts, state
    /// directories. Called once at start-up, before any `start`.
    async fn sweep(&self) -> Result<SweepReport, DriverError>;
}

/// The substrate-specific half of a sandbox.
#[async_trait]
pub trait SandboxControl: Send + Sync {
    async fn usage(&self) -> Result<SandboxUsage, DriverError>;
    /// Kills every process, then removes cgroups, mounts and files. Returns
    /// the usage read just before the cgroups were removed. Idempotent.
    async fn destroy(&self) -> Result<SandboxUsage, DriverError>;
    /// Flips to true when the sandbox ended on its own or was destroyed.
    fn exited(&self) -> tokio::sync::watch::Receiver<bool>;
    /// The guest's exit code once it has exited.
    fn exit_code(&self) -> Option<i32>;
    /// Host pids of every process in the sandbox.
    fn host_pids(&self) -> Vec<u32>;
}

/// A running sandbox. Dropping it without `terminate` still kills it.
pub struct Sandbox {
    id: String,
    start_time: Duration,
    client: GuestClient,
    control: Box<dyn SandboxControl>,
}

impl Sandbox {
    pub fn new(
        id: String,
        start_time: Duration,
        client: GuestClient,
        control: Box<dyn SandboxControl>,
    ) -> Self {
        Sandbox {
            id,
            start_time,
            client,
            control,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// From spawn until the guest answered on the channel (the agent's own
    /// start is not included).
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// Relays one request to the agent; the response streams back.
    pub async fn request(&self, req: Request<BoxBody>) -> Result<Response<Incoming>, DriverError> {
        if *self.control.exited().borrow() {
            return Err(DriverError::GuestGone);
        }
        self.client.request(req).await
    }

    pub async fn usage(&self) -> Result<SandboxUsage, DriverError> {
        self.control.usage().await
    }

    /// The guest's view of the agent; after the sandbox ended, derived from
    /// the guest's exit code.
    pub async fn guest_status(&self) -> Result<GuestStatus, DriverError> {
        if let Some(code) = self.control.exit_code() {
            return Ok(exited_status(code));
        }
        match self.client.status().await {
            Ok(status) => Ok(status),
            Err(e) => self.control.exit_code().map(exited_status).ok_or(e),
        }
    }

    /// Host pids of the sandbox's processes (for tests and diagnostics).
    pub fn host_pids(&self) -> Vec<u32> {
        self.control.host_pids()
    }

    /// Graceful stop, then a hard kill after `grace`; everything the sandbox
    /// held is removed. Returns the final usage.
    pub async fn terminate(self, grace: Duration) -> Result<SandboxUsage, DriverError> {
        let mut exited = self.control.exited();
        if !*exited.borrow() {
            let ask = self.client.shutdown(grace);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), ask).await {
                tracing::debug!(sandbox = %self.id, error = %e, "shutdown request failed");
            }
            let margin = Duration::from_millis(200);
            let t = std::time::Instant::now();
            let _ = tokio::time::timeout(grace + margin, exited.wait_for(|e| *e)).await;
            tracing::debug!(sandbox = %self.id, elapsed = ?t.elapsed(), "guest exited");
        }
        self.control.destroy().await
    }

    /// Resolves to true when the sandbox ended on its own.
    pub fn exited(&self) -> tokio::sync::watch::Receiver<bool> {
        self.control.exited()
    }
}

fn exited_status(code: i32) -> GuestStatus {
    let signal = (code > 128).then_some(code - 128);
    GuestStatus {
        agent_pid: None,
        running: false,
        exit_code: if signal.is_some() { None } else { Some(code) },
        signal,
        shutting_down: false,
    }
}

/// Runs blocking work (cgroup files, image builds) off the runtime threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| DriverError::Spawn(std::io::ErrorKind::Interrupted.into()))?
}

/// Removes a sandbox's directory tree; one already gone is fine.
pub(crate) fn remove_tree(dir: &std::path::Path) -> Result<(), DriverError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DriverError::io("remove", dir)(e)),
    }
}
