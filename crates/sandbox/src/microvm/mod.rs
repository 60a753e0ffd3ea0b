//! The `microvm` substrate: one QEMU microvm per sandbox, started as a
//! copy-on-write clone of a per-version template snapshot.
//!
//! - The guest is the kernel built by `scripts/build-kernel` with the base
//!   image (Python runtime, `/sbin/berth-guest` as init) as its read-only
//!   root and the version image (`app/`, `venv/`) as a second disk; see
//!   `image.rs` and berth-guest's `vm.rs`.
//! - The host talks to the guest over one virtio-serial port: a hello line
//!   (entropy, clock, session, and the agent on first boot), the guest's
//!   ready line, then the same HTTP/2 [`GuestClient`] as every substrate.
//! - Templates: per version key (images, kernel, QEMU, memory, vcpus,
//!   agent), a VM boots with its RAM in a memfd shared with QEMU, runs until
//!   the agent answers `/ping`, parks its channel and is migrated with
//!   `x-ignore-shared` (only device state, ~50 KB, goes into the stream).
//!   The memfd is then sealed against writes and kept by the driver; clones
//!   map it private (copy on write), so no clone's QEMU can change the
//!   template. Templates live in the driver's memory and are rebuilt after a
//!   restart (QEMU 7.2's `readonly=on` maps guest RAM read-only, and a file
//!   opened read-write by each clone uid could be written by it).
//! - QEMU runs as its own uid from `uid_base`, in v1 cgroups (memory = guest
//!   RAM + overhead, cpu quota, pids), with `-sandbox on` (seccomp) and no
//!   network device.

pub mod image;
mod live;
mod qmp;
mod template;
mod vmm;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::process::cgroup::{self, kill_in, parents, rmdir_retry};
use crate::{
    ChannelLimits, Driver, DriverError, Progress, Sandbox, SandboxSpec, SubstrateReport,
    SweepReport,
};

pub use image::ImageStore;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM if a probe boot succeeds, else TCG (with a warning).
    Auto,
    Kvm,
    /// Software emulation: works everywhere, slow.
    Tcg,
}

/// Configuration of the microVM driver.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// Per-VM directories (`vms/`) and, by default, the image store (`images/`).
    pub state_dir: PathBuf,
    /// The `berth-guest` executable, copied into the base image as init.
    pub guest_binary: PathBuf,
    /// The guest kernel (uncompressed vmlinux, PVH), from `scripts/build-kernel`.
    pub kernel: PathBuf,
    /// QEMU (default `qemu-system-x86_64`, looked up on PATH).
    pub qemu: PathBuf,
    /// The Python whose runtime goes into the base image (default /usr/bin/python3).
    pub python: PathBuf,
    /// Image store directory (default `<state_dir>/images`).
    pub images_dir: Option<PathBuf>,
    /// Accelerator (default Auto).
    pub accel: Accel,
    /// How long the KVM probe boot may take (default 3 s).
    pub probe_timeout: Duration,
    /// Parent cgroup name under each controller (default `berth-vm`).
    pub cgroup_name: String,
    /// First uid QEMU processes run as (default 400000).
    pub uid_base: u32,
    /// Number of uids, i.e. most live VMs including template builds (default 10000).
    pub uid_count: u32,
    /// From QEMU's spawn until the guest's ready line (default 30 s).
    pub boot_timeout: Duration,
    /// From a template boot until its agent answers /ping (default 60 s).
    pub template_timeout: Duration,
    /// Hello resent when no ready line came within this (default 1 s).
    pub hello_retry: Duration,
    /// TCG translation cache per VM in MiB (default 32).
    pub tb_size_mb: u64,
    /// Host memory allowed to a QEMU beyond its guest RAM, in MiB (default 192).
    pub memory_overhead_mb: u64,
    /// pids.max of a QEMU's cgroup: its threads (default 256).
    pub qemu_pids: u64,
    /// Between QMP `quit` and SIGKILL on destroy (default 1 s).
    pub kill_grace: Duration,
    /// Largest migration state of a template (default 64 MiB).
    pub max_state_bytes: usize,
    /// Longest console or QEMU stderr line logged at once (default 4 KiB).
    pub max_console_line: usize,
    /// The agent's uid and gid inside the VM (default 1000).
    pub agent_uid: u32,
    /// RLIMIT_NOFILE of the agent (default 4096).
    pub nofile: u64,
    /// Limits on what the guest may send.
    pub channel: ChannelLimits,
}

impl MicrovmConfig {
    /// Defaults for everything but the three paths.
    pub fn new(
        state_dir: impl Into<PathBuf>,
        guest_binary: impl Into<PathBuf>,
        kernel: impl Into<PathBuf>,
    ) -> Self {
        MicrovmConfig {
            state_dir: state_dir.into(),
            guest_binary: guest_binary.into(),
            kernel: kernel.into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            python: PathBuf::from("/usr/bin/python3"),
            images_dir: None,
            accel: Accel::Auto,
            probe_timeout: Duration::from_secs(3),
            cgroup_name: "berth-vm".to_string(),
            uid_base: 400_000,
            uid_count: 10_000,
            boot_timeout: Duration::from_secs(30),
            template_timeout: Duration::from_secs(60),
            hello_retry: Duration::from_secs(1),
            tb_size_mb: 32,
            memory_overhead_mb: 192,
            qemu_pids: 256,
            kill_grace: Duration::from_secs(1),
            max_state_bytes: 64 << 20,
            max_console_line: 4096,
            agent_uid: 1000,
            nofile: 4096,
            channel: ChannelLimits::default(),
        }
    }

    fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }
}

/// Driver for microVM sandboxes. Cheap to clone.
#[derive(Clone)]
pub struct MicrovmDriver {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    cfg: MicrovmConfig,
    images: ImageStore,
    /// The accelerator after the probe (Kvm or Tcg), once decided.
    accel: tokio::sync::OnceCell<Accel>,
    uids: Mutex<BTreeSet<u32>>,
    ids: Mutex<BTreeSet<String>>,
    /// One slot per template key; its lock serializes builds of that key.
    templates: Mutex<BTreeMap<String, template::Slot>>,
}

impl MicrovmDriver {
    pub fn new(cfg: MicrovmConfig) -> Result<Self, DriverError> {
        crate::validate::guest_binary(&cfg.guest_binary, false)?;
        if !cfg.kernel.is_file() {
            return Err(DriverError::Unavailable {
                substrate: "microvm",
                reason: format!(
                    "guest kernel {} missing (build it with scripts/build-kernel)",
                    cfg.kernel.display()
                ),
            });
        }
        let vms = cfg.vms_dir();
        std::fs::create_dir_all(&vms).map_err(DriverError::io("create", &vms))?;
        // QEMU runs as other uids: they may traverse, not list.
        for dir in [&cfg.state_dir, &vms] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(DriverError::io("chmod", dir))?;
        }
        let images_dir = cfg
            .images_dir
            .clone()
            .unwrap_or_else(|| cfg.state_dir.join("images"));
        let images = ImageStore::new(images_dir)?;
        for path in [&cfg.kernel, &cfg.state_dir, &images.dir().to_path_buf()] {
            reachable_by_others(path)?;
        }
        cgroup::ensure_parents(&cfg.cgroup_name)?;
        Ok(MicrovmDriver {
            inner: Arc::new(Inner {
                cfg,
                images,
                accel: tokio::sync::OnceCell::new(),
                uids: Mutex::new(BTreeSet::new()),
                ids: Mutex::new(BTreeSet::new()),
                templates: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &MicrovmConfig {
        &self.inner.cfg
    }

    /// The accelerator VMs use (runs the KVM probe boot once under Auto).
    pub async fn accel(&self) -> Accel {
        self.inner.accel().await
    }
}

impl Inner {
    async fn accel(&self) -> Accel {
        *self
            .accel
            .get_or_init(|| async {
                match self.cfg.accel {
                    Accel::Auto => {
                        match template::probe_kvm(&self.cfg).await {
                            Ok(()) => Accel::Kvm,
                            Err(why) => {
                                tracing::warn!(reason = %why, "KVM is not usable here: microVMs run under TCG (software emulation, slow)");
                                Accel::Tcg
                            }
                        }
                    }
                    other => other,
                }
            })
            .await
    }

    /// Reserves a sandbox id (None: no id, e.g. a template build) and a uid.
    fn reserve(&self, id: Option<&str>) -> Result<u32, DriverError> {
        if let Some(id) = id {
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            if !ids.insert(id.to_string()) {
                return Err(DriverError::AlreadyExists(id.to_string()));
            }
        }
        let cfg = &self.cfg;
        let mut uids = self.uids.lock().unwrap_or_else(|p| p.into_inner());
        let free =
            (cfg.uid_base..cfg.uid_base.saturating_add(cfg.uid_count)).find(|u| !uids.contains(u));
        if let Some(uid) = free {
            uids.insert(uid);
            return Ok(uid);
        }
        let live = uids.len();
        drop(uids);
        if let Some(id) = id {
            self.ids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        Err(DriverError::NoUidSlot(live))
    }

    fn release(&self, id: Option<&str>, uid: u32) {
        self.uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
        if let Some(id) = id {
            self.ids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
    }
}

#[async_trait]
impl Driver for MicrovmDriver {
    fn substrate(&self) -> &'static str {
        "microvm"
    }

    async fn start(&self, spec: SandboxSpec) -> Result<Sandbox, DriverError> {
        validate(&spec)?;
        live::start(self.inner.clone(), spec).await
    }

    async fn prepare(&self, spec: &SandboxSpec, progress: Progress<'_>) -> Result<(), DriverError> {
        validate_version(spec)?;
        if !spec.snapshot {
            template::images(&self.inner, spec, progress).await?;
            return Ok(());
        }
        template::get_or_build(&self.inner, spec, progress)
            .await
            .map(drop)
    }

    /// Kills every QEMU left in this driver's cgroups, removes the cgroups
    /// and every VM directory. Images are kept (content-addressed); templates
    /// live in memory only and are rebuilt on demand.
    async fn sweep(&self) -> Result<SweepReport, DriverError> {
        let cfg = self.inner.cfg.clone();
        tokio::task::spawn_blocking(move || sweep(&cfg))
            .await
            .map_err(|_| DriverError::io("sweep", "vms")(std::io::ErrorKind::Interrupted.into()))?
    }
}

fn sweep(cfg: &MicrovmConfig) -> Result<SweepReport, DriverError> {
    let mut report = SweepReport::default();
    let mut children: Vec<PathBuf> = Vec::new();
    for parent in parents(&cfg.cgroup_name) {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        children.extend(
            entries
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.path()),
        );
    }
    report.processes_killed = kill_in(&children, Duration::from_secs(10))?;
    for child in &children {
        rmdir_retry(child, Duration::from_secs(5))?;
        report.cgroups_removed += 1;
    }
    let vms = cfg.vms_dir();
    if let Ok(entries) = std::fs::read_dir(&vms) {
        for entry in entries.flatten() {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(DriverError::io("remove vm dir", &path))?;
            report.state_dirs_removed += 1;
        }
    }
    Ok(report)
}

/// Whether the microVM substrate can run here, for `berth doctor`: QEMU
/// (and its version), the kernel, and KVM (a bounded probe boot) or TCG.
pub async fn probe(cfg: &MicrovmConfig) -> SubstrateReport {
    let report = |available, detail: String| SubstrateReport {
        substrate: "microvm".into(),
        available,
        detail,
    };
    let version = match template::qemu_version(&cfg.qemu).await {
        Ok(v) => v,
        Err(e) => return report(false, format!("QEMU {}: {e}", cfg.qemu.display())),
    };
    if !cfg.kernel.is_file() {
        return report(
            false,
            format!(
                "guest kernel {} missing (scripts/build-kernel)",
                cfg.kernel.display()
            ),
        );
    }
    let accel = match (cfg.accel, template::probe_kvm(cfg).await) {
        (Accel::Tcg, _) => "tcg (software emulation, slow; configured)".to_string(),
        (_, Ok(())) => "kvm".to_string(),
        (Accel::Kvm, Err(why)) => return report(false, format!("{version}; KVM unusable: {why}")),
        (Accel::Auto, Err(why)) => format!("tcg (software emulation, slow; KVM unusable: {why})"),
    };
    report(
        true,
        format!("{version}, kernel {}, {accel}", cfg.kernel.display()),
    )
}

/// Guest limits: at most 64 vcpus, at least 64 MiB of RAM.
fn validate_version(spec: &SandboxSpec) -> Result<(), DriverError> {
    crate::validate::version(spec, 64.0, 64 << 20)
}

fn validate(spec: &SandboxSpec) -> Result<(), DriverError> {
    crate::validate::spec(spec, 64.0, 64 << 20)
}

/// QEMU runs as uids of its own: every directory above `path` must let
/// others traverse it, or QEMU cannot open its kernel, images and sockets.
/// Refused at start-up with the directory named, never changed behind the
/// operator's back.
fn reachable_by_others(path: &std::path::Path) -> Result<(), DriverError> {
    use std::os::unix::fs::PermissionsExt as _;
    let abs = std::path::absolute(path).map_err(DriverError::io("resolve", path))?;
    for dir in abs.ancestors().skip(1) {
        let mode = std::fs::metadata(dir)
            .map_err(DriverError::io("stat", dir))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(DriverError::Unavailable {
                substrate: "microvm",
                reason: format!(
                    "QEMU runs unprivileged and cannot reach {} through {} (mode {:o}): \
                     let others traverse it (chmod o+x) or keep berth's data elsewhere",
                    path.display(),
                    dir.display(),
                    mode & 0o7777
                ),
            });
        }
    }
    Ok(())
}

/// Guest RAM in MiB and vcpus of a spec (vcpus rounded up).
fn shape(spec: &SandboxSpec) -> (u64, u32) {
    let mem = spec.limits.memory_bytes.div_ceil(1 << 20);
    (mem, spec.limits.vcpus.ceil() as u32)
}
