//! One live gVisor sandbox: its bundle, its cgroups, the runsc process.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::bundle::{self, Layout};
use super::Inner;
use crate::process::cgroup::Cgroups;
use crate::process::spawn::drain;
use crate::{
    blocking, read_preamble, remove_tree, DriverError, GuestClient, Limits, Sandbox,
    SandboxControl, SandboxSpec, SandboxUsage,
};

const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const RMDIR_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a sandbox holds on the host. Released by `destroy`.
struct Live {
    inner: Arc<Inner>,
    id: String,
    cgroups: Cgroups,
    layout: Layout,
    runsc_pid: Mutex<Option<u32>>,
    exited: watch::Receiver<bool>,
    exited_tx: watch::Sender<bool>,
    exit_code: Arc<Mutex<Option<i32>>>,
    destroyed: tokio::sync::Mutex<Option<SandboxUsage>>,
}

fn reserve(inner: &Arc<Inner>, id: &str) -> Result<Live, DriverError> {
    let mut ids = inner.ids.lock().unwrap_or_else(|p| p.into_inner());
    if !ids.insert(id.to_string()) {
        return Err(DriverError::AlreadyExists(id.to_string()));
    }
    let (exited_tx, exited) = watch::channel(false);
    Ok(Live {
        inner: inner.clone(),
        id: id.to_string(),
        cgroups: Cgroups::new(&inner.cfg.cgroup_name, id),
        layout: Layout::new(&inner.cfg.state_dir, id),
        runsc_pid: Mutex::new(None),
        exited,
        exited_tx,
        exit_code: Arc::new(Mutex::new(None)),
        destroyed: tokio::sync::Mutex::new(None),
    })
}

pub async fn start(inner: Arc<Inner>, spec: SandboxSpec) -> Result<Sandbox, DriverError> {
    let live = Arc::new(reserve(&inner, &spec.sandbox_id)?);
    match launch(&live, &spec).await {
        Ok((start_time, client)) => Ok(Sandbox::new(
            spec.sandbox_id,
            start_time,
            client,
            Box::new(GvisorControl { live }),
        )),
        Err(e) => {
            if let Err(cleanup) = live.destroy().await {
                tracing::error!(sandbox = %spec.sandbox_id, error = %cleanup, "cleanup after failed start");
            }
            Err(e)
        }
    }
}

impl Live {
    /// Bundle and cgroups. The host cgroups also hold runsc itself, so they
    /// get `runtime_pids` and `runtime_memory_mb` on top of the agent's
    /// limits (inside, RLIMIT_NPROC holds the agent to its own `pids`).
    fn prepare(&self, spec: &SandboxSpec) -> Result<(), DriverError> {
        let cfg = &self.inner.cfg;
        bundle::write(&self.layout, cfg, spec)?;
        let host = Limits {
            pids: spec.limits.pids.saturating_add(cfg.runtime_pids),
            memory_bytes: spec
                .limits
                .memory_bytes
                .saturating_add(cfg.runtime_memory_mb.saturating_mul(1 << 20)),
            ..spec.limits
        };
        self.cgroups.create(&host)
    }
}

async fn launch(
    live: &Arc<Live>,
    spec: &SandboxSpec,
) -> Result<(Duration, GuestClient), DriverError> {
    let cfg = &live.inner.cfg;
    {
        let live = live.clone();
        let spec = spec.clone();
        blocking(move || live.prepare(&spec)).await?;
    }
    let (host, guest) = std::os::unix::net::UnixStream::pair().map_err(DriverError::Spawn)?;
    let started = Instant::now();
    let mut child = spawn_runsc(live, guest.into())?;
    *live.runsc_pid.lock().unwrap_or_else(|p| p.into_inner()) = child.id();
    let max = cfg.max_output_chunk;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(drain(out, spec.sandbox_id.clone(), "stdout", max));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(drain(err, spec.sandbox_id.clone(), "stderr", max));
    }
    tokio::spawn(watch_exit(
        child,
        live.exited_tx.clone(),
        live.exit_code.clone(),
    ));
    host.set_nonblocking(true).map_err(DriverError::Spawn)?;
    let mut host = tokio::net::UnixStream::from_std(host).map_err(DriverError::Spawn)?;
    match tokio::time::timeout(cfg.setup_timeout, read_preamble(&mut host)).await {
        Ok(result) => result?,
        Err(_) => return Err(DriverError::SetupTimeout(cfg.setup_timeout)),
    }
    let start_time = started.elapsed();
    let client = GuestClient::handshake(host, cfg.channel.clone()).await?;
    Ok((start_time, client))
}

/// `runsc run` in the foreground, inside the sandbox's cgroups from its
/// first instruction, with the channel as its stdin.
fn spawn_runsc(live: &Live, channel: OwnedFd) -> Result<Child, DriverError> {
    let inner = &live.inner;
    let procs: Vec<File> = live
        .cgroups
        .procs_files()
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(|source| DriverError::Cgroup {
                    path: p.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = std::process::Command::new(&inner.runsc);
    cmd.args(runsc_args(inner, &live.layout, &live.id))
        .env_clear()
        .stdin(Stdio::from(channel))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (write, setsid) on descriptors opened before
    // the fork and on a static buffer; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // In cgroup v1, writing 0 to cgroup.procs moves the writer.
            for fd in &fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(DriverError::Spawn);
    // The child has its copies; ours close (the channel's with `cmd`).
    drop(procs);
    child
}

fn runsc_args(inner: &Inner, layout: &Layout, id: &str) -> Vec<String> {
    vec![
        format!("--root={}", layout.runsc_root().display()),
        format!("--platform={}", inner.platform),
        "--network=none".to_string(),
        "--ignore-cgroups".to_string(),
        // Every mount, /app included, gets a private in-memory upper layer
        // that dies with the sandbox (and is charged to its memory cgroup).
        "--overlay2=all:memory".to_string(),
        "--host-uds=none".to_string(),
        "run".to_string(),
        format!("--bundle={}", layout.bundle().display()),
        id.to_string(),
    ]
}

/// Reaps `runsc run` and publishes its exit status, which is the guest's.
async fn watch_exit(mut child: Child, tx: watch::Sender<bool>, code: Arc<Mutex<Option<i32>>>) {
    use std::os::unix::process::ExitStatusExt as _;
    let status = child.wait().await;
    tracing::debug!(?status, "runsc reaped");
    let value = match status {
        Ok(s) => s.code().or(s.signal().map(|sig| 128 + sig)).unwrap_or(1),
        Err(_) => 1,
    };
    *code.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    let _ = tx.send(true);
}

impl Live {
    async fn destroy(self: &Arc<Self>) -> Result<SandboxUsage, DriverError> {
        let mut done = self.destroyed.lock().await;
        if let Some(usage) = *done {
            return Ok(usage);
        }
        let runsc_pid = *self.runsc_pid.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(pid), false) = (runsc_pid, *self.exited.borrow()) {
            // Our direct child, not yet reaped: the pid cannot have been reused.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let t = Instant::now();
        let this = self.clone();
        let usage = blocking(move || this.kill_and_measure()).await?;
        tracing::debug!(sandbox = %self.id, elapsed = ?t.elapsed(), "killed");
        if runsc_pid.is_some() {
            let mut exited = self.exited.clone();
            let _ = tokio::time::timeout(KILL_TIMEOUT, exited.wait_for(|e| *e)).await;
        }
        let this = self.clone();
        blocking(move || this.remove_files()).await?;
        tracing::debug!(sandbox = %self.id, elapsed = ?t.elapsed(), "removed");
        self.inner
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        let _ = self.exited_tx.send(true);
        *done = Some(usage);
        Ok(usage)
    }

    fn kill_and_measure(&self) -> Result<SandboxUsage, DriverError> {
        let before = self.cgroups.usage().unwrap_or_default();
        self.cgroups.kill_all(KILL_TIMEOUT)?;
        Ok(self.cgroups.usage().unwrap_or(before))
    }

    /// Cgroups, then runsc's state and the bundle. Every runsc process was
    /// in the cgroups and is dead, so its state directory is just files.
    fn remove_files(&self) -> Result<(), DriverError> {
        self.cgroups.remove(RMDIR_TIMEOUT)?;
        remove_tree(&self.layout.dir)
    }
}

struct GvisorControl {
    live: Arc<Live>,
}

#[async_trait]
impl SandboxControl for GvisorControl {
    async fn usage(&self) -> Result<SandboxUsage, DriverError> {
        let live = self.live.clone();
        blocking(move || live.cgroups.usage()).await
    }

    async fn destroy(&self) -> Result<SandboxUsage, DriverError> {
        self.live.destroy().await
    }

    fn exited(&self) -> watch::Receiver<bool> {
        self.live.exited.clone()
    }

    fn exit_code(&self) -> Option<i32> {
        *self
            .live
            .exit_code
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn host_pids(&self) -> Vec<u32> {
        self.live.cgroups.pids()
    }
}

impl Drop for GvisorControl {
    /// A sandbox dropped without `terminate` is still destroyed.
    fn drop(&mut self) {
        let live = self.live.clone();
        let name = live.id.clone();
        self.live
            .cgroups
            .destroy_on_drop(&name, async move { live.destroy().await });
    }
}
