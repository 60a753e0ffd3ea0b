//! Templates: one booted-and-snapshotted VM per version key, cloned by
//! every session; plus the KVM probe and the image lookup they share.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag as MFdFlags};
use serde_json::json;
use tokio::io::AsyncReadExt;

use super::live::Vm;
use super::qmp::Qmp;
use super::vmm::Memory;
use super::{shape, Accel, Inner, MicrovmConfig};
use crate::{DriverError, Progress, SandboxSpec};

/// A snapshotted agent: RAM in a sealed memfd, device state in memory.
pub(crate) struct Template {
    pub key: String,
    pub memory: OwnedFd,
    pub state: Vec<u8>,
    pub base: PathBuf,
    pub version: PathBuf,
}

/// The template of one key, built at most once at a time.
pub(crate) type Slot = Arc<tokio::sync::Mutex<Option<Arc<Template>>>>;

fn image_err(e: tokio::task::JoinError) -> DriverError {
    DriverError::Image {
        image: "microvm".into(),
        detail: e.to_string(),
    }
}

/// The base and version images of `spec` (built when missing).
pub(crate) async fn images(
    inner: &Arc<Inner>,
    spec: &SandboxSpec,
    progress: Progress<'_>,
) -> Result<(PathBuf, PathBuf), DriverError> {
    let this = inner.clone();
    let (app, venv) = (spec.app_dir.clone(), spec.venv_dir.clone());
    progress("microvm: images");
    tokio::task::spawn_blocking(move || {
        let quiet: Progress<'_> = &|line: &str| tracing::debug!("{line}");
        let cfg = &this.cfg;
        let base = this.images.base(&cfg.guest_binary, &cfg.python, quiet)?;
        let version = this.images.version(&app, venv.as_deref(), quiet)?;
        Ok((base, version))
    })
    .await
    .map_err(image_err)?
}

/// What a template depends on; any change names a new template.
fn key(cfg: &MicrovmConfig, spec: &SandboxSpec, base: &Path, version: &Path, qemu: &str) -> String {
    let mut h = DefaultHasher::new();
    let (mem, vcpus) = shape(spec);
    (base, version, qemu, mem, vcpus).hash(&mut h);
    (
        &spec.entrypoint,
        &spec.env,
        spec.agent_port,
        spec.limits.pids,
    )
        .hash(&mut h);
    (cfg.agent_uid, cfg.nofile, cfg.tb_size_mb).hash(&mut h);
    if let Ok(m) = std::fs::metadata(&cfg.kernel) {
        (m.ino(), m.size(), m.mtime(), m.mtime_nsec()).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// The template of `spec`'s version, built if missing or stale.
pub(crate) async fn get_or_build(
    inner: &Arc<Inner>,
    spec: &SandboxSpec,
    progress: Progress<'_>,
) -> Result<Arc<Template>, DriverError> {
    let (base, version) = images(inner, spec, progress).await?;
    let qemu = qemu_version(&inner.cfg.qemu)
        .await
        .map_err(|e| DriverError::Vmm(format!("QEMU version: {e}")))?;
    let key = key(&inner.cfg, spec, &base, &version, &qemu);
    let slot = {
        let mut map = inner.templates.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().clone()
    };
    let mut guard = slot.lock().await;
    if let Some(t) = guard.as_ref() {
        return Ok(t.clone());
    }
    progress("microvm: booting the template VM");
    let t = Instant::now();
    let template = Arc::new(build(inner, spec, key, base, version).await?);
    tracing::info!(key = %template.key, elapsed = ?t.elapsed(), "microvm template built");
    progress("microvm: template snapshotted");
    *guard = Some(template.clone());
    Ok(template)
}

fn memfd(size_mb: u64) -> Result<OwnedFd, DriverError> {
    let fail = |e: nix::errno::Errno| DriverError::io("memfd", "template")(e.into());
    let fd = memfd_create(
        c"berth-template",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(fail)?;
    let len = i64::try_from(size_mb << 20).map_err(|_| fail(nix::errno::Errno::EFBIG))?;
    nix::unistd::ftruncate(&fd, len).map_err(fail)?;
    Ok(fd)
}

async fn build(
    inner: &Arc<Inner>,
    spec: &SandboxSpec,
    key: String,
    base: PathBuf,
    version: PathBuf,
) -> Result<Template, DriverError> {
    let (mem, _) = shape(spec);
    let memory = memfd(mem)?;
    let accel = inner.accel().await;
    let name = format!("tmpl-{key}-{}", std::process::id());
    let vm = Vm::create(inner, None, name, &spec.limits)?;
    let state = snapshot(inner, &vm, spec, accel, [&base, &version], &memory).await;
    // The template QEMU must be gone (its shared mapping too) before sealing.
    let destroyed = vm.destroy().await;
    let state = state?;
    destroyed?;
    let seals = SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_SEAL;
    fcntl(memory.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| DriverError::io("seal", "template memory")(e.into()))?;
    Ok(Template {
        key,
        memory,
        state,
        base,
        version,
    })
}

/// Boots the template, waits for the agent, parks it and migrates it out.
async fn snapshot(
    inner: &Arc<Inner>,
    vm: &Vm,
    spec: &SandboxSpec,
    accel: Accel,
    disks: [&Path; 2],
    memory: &OwnedFd,
) -> Result<Vec<u8>, DriverError> {
    let cfg = &inner.cfg;
    let vmm = vm.launch(accel, disks, Memory::TemplateSource(memory), false)?;
    let mut qmp = Qmp::connect(&vm.qmp_path(), cfg.boot_timeout).await?;
    // The guest answers once its agent is healthy, without HTTP/2, and
    // waits for the next hello: nothing is in flight on the port when the
    // host hangs up and the VM stops.
    let agent = Some(vm.agent_spec(spec));
    let stream = vm
        .hello("template", agent, Some(cfg.template_timeout))
        .await?;
    drop(stream);
    let _ = vmm;
    qmp.execute("stop", json!({})).await?;
    qmp.execute("migrate-set-capabilities", ignore_shared())
        .await?;
    let sock = vm.migration_path();
    let listener = tokio::net::UnixListener::bind(&sock).map_err(DriverError::io("bind", &sock))?;
    let uid = nix::unistd::Uid::from_raw(vm.uid);
    nix::unistd::chown(&sock, Some(uid), None)
        .map_err(|e| DriverError::io("chown", &sock)(e.into()))?;
    let uri = format!("unix:{}", sock.display());
    qmp.execute("migrate", json!({ "uri": uri })).await?;
    let receive = async {
        let (conn, _) = listener
            .accept()
            .await
            .map_err(DriverError::io("accept", &sock))?;
        let mut state = Vec::new();
        conn.take(cfg.max_state_bytes as u64 + 1)
            .read_to_end(&mut state)
            .await
            .map_err(DriverError::io("read state", &sock))?;
        if state.len() > cfg.max_state_bytes {
            return Err(DriverError::Vmm(
                "template state exceeds max_state_bytes".into(),
            ));
        }
        Ok(state)
    };
    let state = tokio::time::timeout(cfg.boot_timeout, receive)
        .await
        .map_err(|_| DriverError::Vmm("template migration timed out".into()))??;
    wait_migrated(&mut qmp, cfg.boot_timeout).await?;
    let _ = qmp.execute("quit", json!({})).await;
    Ok(state)
}

pub(crate) fn ignore_shared() -> serde_json::Value {
    json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
}

/// Polls `query-migrate` until the migration completed.
pub(crate) async fn wait_migrated(qmp: &mut Qmp, timeout: Duration) -> Result<(), DriverError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = qmp.execute("query-migrate", json!({})).await?;
        match status.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                return Err(DriverError::Vmm(format!("migration failed: {status}")))
            }
            _ if tokio::time::Instant::now() > deadline => {
                return Err(DriverError::Vmm("migration did not complete".into()))
            }
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// `qemu --version`'s first line.
pub(crate) async fn qemu_version(qemu: &Path) -> Result<String, String> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .env_clear()
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|_| out.status.success())
        .map(str::to_string)
        .ok_or_else(|| format!("--version failed: {}", out.status))
}

/// Boots the kernel under KVM with no disks: a working KVM reaches the
/// "no root" panic and QEMU exits (reboot) within `probe_timeout`.
pub(crate) async fn probe_kvm(cfg: &MicrovmConfig) -> Result<(), String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm cannot be opened".into());
    }
    let child = tokio::process::Command::new(&cfg.qemu)
        .args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "64M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(&cfg.kernel)
        .args(["-append", "console=ttyS0 reboot=t panic=-1"])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", cfg.qemu.display()))?;
    let out = tokio::time::timeout(cfg.probe_timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("probe boot did not finish within {:?}", cfg.probe_timeout))?
        .map_err(|e| e.to_string())?;
    let console = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && console.contains("Kernel panic") {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "probe boot failed ({}): {}",
        out.status,
        err.lines().next().unwrap_or("no output")
    ))
}
