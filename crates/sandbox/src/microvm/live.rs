//! One VM on the host (a session's sandbox or a template build): its uid,
//! directory, cgroups and QEMU; the hello exchange; teardown.

use std::io::Read as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use berth_guest::proto::{VmAgentSpec, VmHello, VM_READY_PREFIX};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::qmp::{connect_retry, Qmp};
use super::template::{get_or_build, ignore_shared, images};
use super::vmm::{self, Launch, Memory, Vmm};
use super::{Accel, Inner};
use crate::process::cgroup::Cgroups;
use crate::{
    blocking, remove_tree, DriverError, GuestClient, Limits, Sandbox, SandboxControl, SandboxSpec,
    SandboxUsage,
};

const KILL_TIMEOUT: Duration = Duration::from_secs(10);
const RMDIR_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest line the host reads while waiting for the ready line.
const MAX_READY_LINE: usize = 256;

/// A VM's host resources. Released by `destroy`.
pub(crate) struct Vm {
    inner: Arc<Inner>,
    /// Directory and cgroup name.
    name: String,
    sandbox_id: Option<String>,
    pub uid: u32,
    dir: PathBuf,
    cgroups: Cgroups,
    mem_mb: u64,
    vcpus: u32,
    vmm: OnceLock<Vmm>,
    exited_tx: watch::Sender<bool>,
    exited: watch::Receiver<bool>,
    destroyed: tokio::sync::Mutex<Option<SandboxUsage>>,
}

impl Vm {
    /// Reserves a uid (and the sandbox id), creates the directory and cgroups.
    pub(crate) fn create(
        inner: &Arc<Inner>,
        sandbox_id: Option<&str>,
        name: String,
        limits: &Limits,
    ) -> Result<Vm, DriverError> {
        let uid = inner.reserve(sandbox_id)?;
        let cfg = &inner.cfg;
        let (exited_tx, exited) = watch::channel(false);
        let mem_mb = limits.memory_bytes.div_ceil(1 << 20);
        let vm = Vm {
            inner: inner.clone(),
            dir: cfg.vms_dir().join(&name),
            cgroups: Cgroups::new(&cfg.cgroup_name, &name),
            name,
            sandbox_id: sandbox_id.map(str::to_string),
            uid,
            mem_mb,
            vcpus: limits.vcpus.ceil() as u32,
            vmm: OnceLock::new(),
            exited_tx,
            exited,
            destroyed: tokio::sync::Mutex::new(None),
        };
        if let Err(e) = vm.prepare(limits) {
            let _ = vm.remove_files();
            inner.release(sandbox_id, uid);
            return Err(e);
        }
        Ok(vm)
    }

    fn prepare(&self, limits: &Limits) -> Result<(), DriverError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .map_err(DriverError::io("create", &self.dir))?;
        let id = Uid::from_raw(self.uid);
        nix::unistd::chown(&self.dir, Some(id), Some(Gid::from_raw(self.uid)))
            .map_err(|e| DriverError::io("chown", &self.dir)(e.into()))?;
        let cfg = &self.inner.cfg;
        self.cgroups.create(&Limits {
            vcpus: limits.vcpus,
            memory_bytes: (self.mem_mb + cfg.memory_overhead_mb) << 20,
            pids: cfg.qemu_pids,
        })
    }

    pub(crate) fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    pub(crate) fn migration_path(&self) -> PathBuf {
        self.dir.join("migrate.sock")
    }

    fn agent_path(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Starts QEMU once.
    pub(crate) fn launch(
        &self,
        accel: Accel,
        disks: [&Path; 2],
        memory: Memory<'_>,
        incoming: bool,
    ) -> Result<&Vmm, DriverError> {
        let procs = self.cgroups.procs_files();
        let launch = Launch {
            id: &self.name,
            dir: &self.dir,
            uid: self.uid,
            accel,
            vcpus: self.vcpus,
            memory_mb: self.mem_mb,
            disks,
            memory,
            incoming,
            cgroup_procs: &procs,
        };
        let vmm = vmm::spawn(&self.inner.cfg, &launch)?;
        let mut qemu_exited = vmm.exited.clone();
        let tx = self.exited_tx.clone();
        tokio::spawn(async move {
            let _ = qemu_exited.wait_for(|e| *e).await;
            let _ = tx.send(true);
        });
        let _ = self.vmm.set(vmm);
        self.vmm
            .get()
            .ok_or_else(|| DriverError::Vmm("QEMU not started".into()))
    }

    pub(crate) fn agent_spec(&self, spec: &SandboxSpec) -> VmAgentSpec {
        let cfg = &self.inner.cfg;
        VmAgentSpec {
            entrypoint: spec.entrypoint.clone(),
            env: spec.env.clone(),
            agent_port: spec.agent_port,
            uid: cfg.agent_uid,
            gid: cfg.agent_uid,
            nofile: cfg.nofile,
            nproc: spec.limits.pids,
        }
    }

    /// Connects to the guest's port, sends the hello (resent every
    /// `hello_retry`) and reads until the ready line with its nonce,
    /// discarding anything else. Returns the stream, ready for HTTP/2.
    pub(crate) async fn hello(
        &self,
        session_id: &str,
        agent: Option<VmAgentSpec>,
        park: Option<Duration>,
    ) -> Result<UnixStream, DriverError> {
        let cfg = &self.inner.cfg;
        // A parking guest answers only after its agent is healthy; a resent
        // hello would reach it after the host hung up.
        let (retry, timeout) = match park {
            Some(t) => (t + cfg.boot_timeout, t + cfg.boot_timeout),
            None => (cfg.hello_retry, cfg.boot_timeout),
        };
        let mut exited = self.exited.clone();
        let exchange = async {
            let mut stream = connect_retry(&self.agent_path(), cfg.boot_timeout).await?;
            let nonce = nonce()?;
            let want = format!("{VM_READY_PREFIX}{nonce}");
            let mut line = Vec::new();
            loop {
                let hello = VmHello {
                    nonce,
                    session_id: session_id.to_string(),
                    seed: random_bytes(32)?,
                    time_secs: 0,
                    time_nanos: 0,
                    agent: agent.clone(),
                    park_after_ping_ms: park.map(|t| t.as_millis() as u64),
                };
                let mut bytes = serde_json::to_vec(&stamped(hello))
                    .map_err(|e| DriverError::Vmm(format!("encode hello: {e}")))?;
                bytes.push(b'\n');
                stream
                    .write_all(&bytes)
                    .await
                    .map_err(|_| DriverError::GuestGone)?;
                let attempt = tokio::time::Instant::now() + retry;
                while let Ok(byte) = tokio::time::timeout_at(attempt, stream.read_u8()).await {
                    let byte = byte.map_err(|_| DriverError::GuestGone)?;
                    if byte != b'\n' {
                        if line.len() <= MAX_READY_LINE {
                            line.push(byte);
                        }
                        continue;
                    }
                    if line == want.as_bytes() {
                        return Ok(stream);
                    }
                    line.clear();
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, exchange) => {
                r.map_err(|_| DriverError::SetupTimeout(timeout))?
            }
            _ = exited.wait_for(|e| *e) => Err(self.gone()),
        }
    }

    /// Why QEMU is gone, from its last stderr line.
    fn gone(&self) -> DriverError {
        let last = self
            .vmm
            .get()
            .map(|v| {
                v.last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .unwrap_or_default();
        if last.is_empty() {
            DriverError::GuestGone
        } else {
            DriverError::Vmm(format!("QEMU exited: {last}"))
        }
    }

    /// QMP quit, SIGKILL after the grace, then cgroups and files removed.
    /// Returns the usage read just before the cgroups went. Idempotent.
    pub(crate) async fn destroy(&self) -> Result<SandboxUsage, DriverError> {
        let mut done = self.destroyed.lock().await;
        if let Some(usage) = *done {
            return Ok(usage);
        }
        let cfg = &self.inner.cfg;
        let mut exited = self.exited.clone();
        let running = !*exited.borrow();
        if let (Some(vmm), true) = (self.vmm.get(), running) {
            let quit = async {
                let mut qmp = Qmp::connect(&self.qmp_path(), Duration::from_millis(100)).await?;
                qmp.execute("quit", json!({})).await
            };
            let _ = tokio::time::timeout(cfg.kill_grace, quit).await;
            if tokio::time::timeout(cfg.kill_grace, exited.wait_for(|e| *e))
                .await
                .is_err()
            {
                // Our child, not yet reaped: the pid cannot have been reused.
                let _ = kill(Pid::from_raw(vmm.pid as i32), Signal::SIGKILL);
            }
        }
        let cgroups = self.cgroups.clone();
        let usage = blocking(move || {
            let before = cgroups.usage().unwrap_or_default();
            cgroups.kill_all(KILL_TIMEOUT)?;
            Ok(cgroups.usage().unwrap_or(before))
        })
        .await?;
        if self.vmm.get().is_some() {
            let _ = tokio::time::timeout(KILL_TIMEOUT, exited.wait_for(|e| *e)).await;
        }
        let (cgroups, dir) = (self.cgroups.clone(), self.dir.clone());
        blocking(move || remove(&cgroups, &dir)).await?;
        self.inner.release(self.sandbox_id.as_deref(), self.uid);
        let _ = self.exited_tx.send(true);
        *done = Some(usage);
        Ok(usage)
    }

    fn remove_files(&self) -> Result<(), DriverError> {
        remove(&self.cgroups, &self.dir)
    }
}

fn remove(cgroups: &Cgroups, dir: &Path) -> Result<(), DriverError> {
    cgroups.remove(RMDIR_TIMEOUT)?;
    remove_tree(dir)
}

fn stamped(mut hello: VmHello) -> VmHello {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    hello.time_secs = now.as_secs() as i64;
    hello.time_nanos = now.subsec_nanos();
    hello
}

fn random_bytes(n: usize) -> Result<Vec<u8>, DriverError> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(DriverError::io("read", "/dev/urandom"))?;
    Ok(buf)
}

fn nonce() -> Result<u64, DriverError> {
    let b = random_bytes(8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(&b);
    Ok(u64::from_ne_bytes(a))
}

/// Starts a session's VM: a clone of the version's template, or a fresh
/// boot when `spec.snapshot` is false. A clone whose guest does not answer
/// its first status request (seen under heavy load: the request never
/// comes back) is destroyed and started once more.
pub(crate) async fn start(inner: Arc<Inner>, spec: SandboxSpec) -> Result<Sandbox, DriverError> {
    match start_once(inner.clone(), spec.clone()).await {
        Err(DriverError::FirstAnswer) if spec.snapshot => {
            tracing::warn!(sandbox = %spec.sandbox_id, "clone did not answer; starting it again");
            start_once(inner, spec).await
        }
        other => other,
    }
}

async fn start_once(inner: Arc<Inner>, spec: SandboxSpec) -> Result<Sandbox, DriverError> {
    let quiet = |_: &str| {};
    let template = match spec.snapshot {
        true => Some(get_or_build(&inner, &spec, &quiet).await?),
        false => None,
    };
    let disks = match &template {
        Some(t) => (t.base.clone(), t.version.clone()),
        None => images(&inner, &spec, &quiet).await?,
    };
    let accel = inner.accel().await;
    let vm = Arc::new(Vm::create(
        &inner,
        Some(&spec.sandbox_id),
        spec.sandbox_id.clone(),
        &spec.limits,
    )?);
    let started = Instant::now();
    let booted = async {
        let disks = [disks.0.as_path(), disks.1.as_path()];
        let stream = match &template {
            Some(t) => {
                vm.launch(accel, disks, Memory::Clone(&t.memory), true)?;
                restore(&vm, &t.state).await?;
                vm.hello(&spec.session_id, None, None).await?
            }
            None => {
                vm.launch(accel, disks, Memory::Private, false)?;
                vm.hello(&spec.session_id, Some(vm.agent_spec(&spec)), None)
                    .await?
            }
        };
        let start_time = started.elapsed();
        let client = GuestClient::handshake(stream, inner.cfg.channel.clone()).await?;
        match tokio::time::timeout(inner.cfg.boot_timeout, client.status()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(DriverError::FirstAnswer),
        }
        Ok::<_, DriverError>((start_time, client))
    };
    match booted.await {
        Ok((start_time, client)) => {
            tracing::debug!(sandbox = %spec.sandbox_id, ?start_time, clone = template.is_some(), "microvm started");
            let control = VmControl { vm };
            Ok(Sandbox::new(
                spec.sandbox_id,
                start_time,
                client,
                Box::new(control),
            ))
        }
        Err(e) => {
            if let Err(cleanup) = vm.destroy().await {
                tracing::error!(sandbox = %spec.sandbox_id, error = %cleanup, "cleanup after failed start");
            }
            Err(e)
        }
    }
}

/// Feeds the template's device state into a clone started with
/// `-incoming defer`; the guest runs once it is loaded.
async fn restore(vm: &Vm, state: &[u8]) -> Result<(), DriverError> {
    let cfg = &vm.inner.cfg;
    let mut qmp = Qmp::connect(&vm.qmp_path(), cfg.boot_timeout).await?;
    qmp.execute("migrate-set-capabilities", ignore_shared())
        .await?;
    let uri = format!("unix:{}", vm.migration_path().display());
    qmp.execute("migrate-incoming", json!({ "uri": uri }))
        .await?;
    let mut conn = connect_retry(&vm.migration_path(), cfg.boot_timeout).await?;
    conn.write_all(state)
        .await
        .map_err(DriverError::io("write state", vm.migration_path()))?;
    conn.shutdown()
        .await
        .map_err(DriverError::io("write state", vm.migration_path()))?;
    super::template::wait_migrated(&mut qmp, cfg.boot_timeout).await?;
    let status = qmp.execute("query-status", json!({})).await?;
    tracing::debug!(%status, "clone restored");
    if status.get("status").and_then(|s| s.as_str()) != Some("running") {
        qmp.execute("cont", json!({})).await?;
    }
    Ok(())
}

struct VmControl {
    vm: Arc<Vm>,
}

#[async_trait]
impl SandboxControl for VmControl {
    async fn usage(&self) -> Result<SandboxUsage, DriverError> {
        let cgroups = self.vm.cgroups.clone();
        blocking(move || cgroups.usage()).await
    }

    async fn destroy(&self) -> Result<SandboxUsage, DriverError> {
        self.vm.destroy().await
    }

    fn exited(&self) -> watch::Receiver<bool> {
        self.vm.exited.clone()
    }

    fn exit_code(&self) -> Option<i32> {
        let vmm = self.vm.vmm.get()?;
        *vmm.exit_code.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn host_pids(&self) -> Vec<u32> {
        self.vm.cgroups.pids()
    }
}

impl Drop for VmControl {
    /// A sandbox dropped without `terminate` is still destroyed.
    fn drop(&mut self) {
        let vm = self.vm.clone();
        let name = vm.name.clone();
        self.vm
            .cgroups
            .destroy_on_drop(&name, async move { vm.destroy().await });
    }
}
