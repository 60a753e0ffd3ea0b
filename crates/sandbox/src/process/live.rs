//! One live process sandbox: its resources, its start, its teardown.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_guest::proto::GuestSpec;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid};
use tokio::sync::watch;

use super::cgroup::Cgroups;
use super::{cleanup, spawn, Inner};
use crate::{
    blocking, read_preamble, remove_tree, DriverError, GuestClient, Sandbox, SandboxControl,
    SandboxSpec, SandboxUsage,
};

const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const RMDIR_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a sandbox holds on the host. Released by `destroy`.
struct Live {
    inner: Arc<Inner>,
    id: String,
    uid: u32,
    cgroups: Cgroups,
    state_dir: PathBuf,
    guest_pid: Mutex<Option<u32>>,
    exited: watch::Receiver<bool>,
    exited_tx: watch::Sender<bool>,
    exit_code: Arc<Mutex<Option<i32>>>,
    destroyed: tokio::sync::Mutex<Option<SandboxUsage>>,
}

/// Reserves an id and a uid, and names the sandbox's resources.
fn reserve(inner: &Arc<Inner>, id: &str) -> Result<Live, DriverError> {
    let cfg = &inner.cfg;
    {
        let mut ids = inner.ids.lock().unwrap_or_else(|p| p.into_inner());
        if !ids.insert(id.to_string()) {
            return Err(DriverError::AlreadyExists(id.to_string()));
        }
    }
    let uid = {
        let mut uids = inner.uids.lock().unwrap_or_else(|p| p.into_inner());
        let free =
            (cfg.uid_base..cfg.uid_base.saturating_add(cfg.uid_count)).find(|u| !uids.contains(u));
        free.inspect(|u| {
            uids.insert(*u);
        })
    };
    let Some(uid) = uid else {
        inner
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let live = inner.uids.lock().unwrap_or_else(|p| p.into_inner()).len();
        return Err(DriverError::NoUidSlot(live));
    };
    let (exited_tx, exited) = watch::channel(false);
    Ok(Live {
        inner: inner.clone(),
        id: id.to_string(),
        uid,
        cgroups: Cgroups::new(&cfg.cgroup_name, id),
        state_dir: cfg.state_dir.join(id),
        guest_pid: Mutex::new(None),
        exited,
        exited_tx,
        exit_code: Arc::new(Mutex::new(None)),
        destroyed: tokio::sync::Mutex::new(None),
    })
}

pub async fn start(inner: Arc<Inner>, spec: SandboxSpec) -> Result<Sandbox, DriverError> {
    let live = Arc::new(reserve(&inner, &spec.sandbox_id)?);
    match launch(&live, &spec).await {
        Ok((start_time, client)) => {
            let control = ProcessControl { live };
            Ok(Sandbox::new(
                spec.sandbox_id,
                start_time,
                client,
                Box::new(control),
            ))
        }
        Err(e) => {
            if let Err(cleanup) = live.destroy().await {
                tracing::error!(sandbox = %spec.sandbox_id, error = %cleanup, "cleanup after failed start");
            }
            Err(e)
        }
    }
}

impl Live {
    /// State directory, cgroups, spec file. Returns the spec file's path.
    fn prepare(&self, spec: &SandboxSpec) -> Result<PathBuf, DriverError> {
        let cfg = &self.inner.cfg;
        let dir = &self.state_dir;
        for sub in ["upper", "work", "root"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(DriverError::io("create", &path))?;
        }
        let upper = dir.join("upper");
        nix::unistd::chown(
            &upper,
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.uid)),
        )
        .map_err(|e| DriverError::io("chown", &upper)(e.into()))?;
        self.cgroups.create(&spec.limits)?;
        let guest = GuestSpec {
            sandbox_id: spec.sandbox_id.clone(),
            root_dir: dir.join("root"),
            upper_dir: upper,
            work_dir: dir.join("work"),
            app_dir: spec.app_dir.clone(),
            venv_dir: spec.venv_dir.clone(),
            entrypoint: spec.entrypoint.clone(),
            env: spec.env.clone(),
            agent_port: spec.agent_port,
            uid: self.uid,
            gid: self.uid,
            cgroup_procs: self.cgroups.procs_files(),
            tmp_size_mb: cfg.tmp_size_mb,
            readonly_host_paths: cfg.readonly_host_paths.clone(),
            nofile: cfg.nofile,
            nproc: spec.limits.pids,
        };
        let path = dir.join("spec.json");
        let json =
            serde_json::to_vec(&guest).map_err(|e| DriverError::io("encode", &path)(e.into()))?;
        std::fs::write(&path, json).map_err(DriverError::io("write", &path))?;
        Ok(path)
    }
}

async fn launch(
    live: &Arc<Live>,
    spec: &SandboxSpec,
) -> Result<(Duration, GuestClient), DriverError> {
    let cfg = &live.inner.cfg;
    let spec_path = {
        let live = live.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || live.prepare(&spec))
            .await
            .map_err(|_| DriverError::Spawn(std::io::ErrorKind::Interrupted.into()))??
    };
    let (host, guest) = std::os::unix::net::UnixStream::pair().map_err(DriverError::Spawn)?;
    let started = Instant::now();
    let mut child = spawn::spawn_guest(&cfg.guest_binary, &spec_path, guest.into())
        .map_err(DriverError::Spawn)?;
    *live.guest_pid.lock().unwrap_or_else(|p| p.into_inner()) = child.id();
    let max = cfg.max_output_chunk;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(spawn::drain(out, spec.sandbox_id.clone(), "stdout", max));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(spawn::drain(err, spec.sandbox_id.clone(), "stderr", max));
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

/// Reaps the guest's setup parent and publishes its exit.
async fn watch_exit(
    mut child: tokio::process::Child,
    tx: watch::Sender<bool>,
    code: Arc<Mutex<Option<i32>>>,
) {
    use std::os::unix::process::ExitStatusExt as _;
    let status = child.wait().await;
    tracing::debug!(?status, "guest parent reaped");
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
        let guest_pid = *self.guest_pid.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(pid), false) = (guest_pid, *self.exited.borrow()) {
            // Our direct child, not yet reaped: the pid cannot have been reused.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let t = Instant::now();
        let this = self.clone();
        let usage = blocking(move || this.kill_and_measure()).await?;
        tracing::debug!(sandbox = %self.id, elapsed = ?t.elapsed(), "killed");
        if guest_pid.is_some() {
            let mut exited = self.exited.clone();
            let _ = tokio::time::timeout(KILL_TIMEOUT, exited.wait_for(|e| *e)).await;
        }
        tracing::debug!(sandbox = %self.id, elapsed = ?t.elapsed(), "reaped");
        let this = self.clone();
        blocking(move || this.remove_files()).await?;
        tracing::debug!(sandbox = %self.id, elapsed = ?t.elapsed(), "removed");
        self.release();
        let _ = self.exited_tx.send(true);
        *done = Some(usage);
        Ok(usage)
    }

    fn kill_and_measure(&self) -> Result<SandboxUsage, DriverError> {
        let before = self.cgroups.usage().unwrap_or_default();
        self.cgroups.kill_all(KILL_TIMEOUT)?;
        // cpu time is complete only once everything is dead.
        Ok(self.cgroups.usage().unwrap_or(before))
    }

    fn remove_files(&self) -> Result<(), DriverError> {
        self.cgroups.remove(RMDIR_TIMEOUT)?;
        cleanup::unmount_under(&self.state_dir)?;
        remove_tree(&self.state_dir)
    }

    /// Frees the uid and the id; only called once no process is left.
    fn release(&self) {
        self.inner
            .uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.uid);
        self.inner
            .ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

struct ProcessControl {
    live: Arc<Live>,
}

#[async_trait]
impl SandboxControl for ProcessControl {
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

impl Drop for ProcessControl {
    /// A sandbox dropped without `terminate` is still destroyed.
    fn drop(&mut self) {
        let live = self.live.clone();
        let name = live.id.clone();
        self.live
            .cgroups
            .destroy_on_drop(&name, async move { live.destroy().await });
    }
}
