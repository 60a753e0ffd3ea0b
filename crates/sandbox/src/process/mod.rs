//! The `process` substrate: Linux namespaces, a pivot_root'ed tmpfs root,
//! cgroup v1 limits, a private uid per sandbox, no_new_privs and seccomp.
//! The guest binary does the in-sandbox half (see berth-guest).

pub(crate) mod cgroup;
pub(crate) mod cleanup;
mod live;
pub(crate) mod spawn;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::{ChannelLimits, Driver, DriverError, Sandbox, SandboxSpec, SweepReport};

pub use cgroup::{CGROUP_ROOT, CONTROLLERS};
pub use cleanup::{mount_points, mounts_under};

/// Configuration of the process driver.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Where per-sandbox state (overlay upper layer, root mountpoint) lives.
    pub state_dir: PathBuf,
    /// The `berth-guest` executable.
    pub guest_binary: PathBuf,
    /// Parent cgroup name under each controller (default `berth`).
    pub cgroup_name: String,
    /// First uid handed to sandboxes (default 200000).
    pub uid_base: u32,
    /// Number of uids, i.e. most live sandboxes (default 10000).
    pub uid_count: u32,
    /// Size of each sandbox's /tmp in MiB (default 256).
    pub tmp_size_mb: u64,
    /// Host paths mounted read-only at the same place inside.
    pub readonly_host_paths: Vec<PathBuf>,
    /// How long the guest may take to build the sandbox (default 10 s).
    pub setup_timeout: Duration,
    /// RLIMIT_NOFILE inside (default 4096).
    pub nofile: u64,
    /// Limits on what the guest may send.
    pub channel: ChannelLimits,
    /// Largest chunk of agent output logged at once (default 8 KiB).
    pub max_output_chunk: usize,
}

impl ProcessConfig {
    /// Defaults for everything but the two paths.
    pub fn new(state_dir: impl Into<PathBuf>, guest_binary: impl Into<PathBuf>) -> Self {
        ProcessConfig {
            state_dir: state_dir.into(),
            guest_binary: guest_binary.into(),
            cgroup_name: "berth".to_string(),
            uid_base: 200_000,
            uid_count: 10_000,
            tmp_size_mb: 256,
            readonly_host_paths: [
                "/usr",
                "/etc/ssl",
                "/etc/ca-certificates",
                "/etc/alternatives",
                "/etc/localtime",
                "/etc/ld.so.cache",
                "/etc/mime.types",
            ]
            .iter()
            .map(PathBuf::from)
            .collect(),
            setup_timeout: Duration::from_secs(10),
            nofile: 4096,
            channel: ChannelLimits::default(),
            max_output_chunk: 8 * 1024,
        }
    }
}

/// Driver for process sandboxes. Cheap to clone.
#[derive(Clone)]
pub struct ProcessDriver {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ProcessConfig,
    /// Uids of live sandboxes; a uid is freed only when its processes are gone.
    uids: Mutex<BTreeSet<u32>>,
    /// Ids of live sandboxes.
    ids: Mutex<BTreeSet<String>>,
}

impl ProcessDriver {
    pub fn new(cfg: ProcessConfig) -> Result<Self, DriverError> {
        crate::validate::guest_binary(&cfg.guest_binary, false)?;
        check_overlay_path("state_dir", &cfg.state_dir)?;
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(DriverError::io("create", &cfg.state_dir))?;
        cgroup::ensure_parents(&cfg.cgroup_name)?;
        Ok(ProcessDriver {
            inner: Arc::new(Inner {
                cfg,
                uids: Mutex::new(BTreeSet::new()),
                ids: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    pub fn config(&self) -> &ProcessConfig {
        &self.inner.cfg
    }
}

#[async_trait]
impl Driver for ProcessDriver {
    fn substrate(&self) -> &'static str {
        "process"
    }

    async fn start(&self, spec: SandboxSpec) -> Result<Sandbox, DriverError> {
        validate(&spec)?;
        live::start(self.inner.clone(), spec).await
    }

    async fn sweep(&self) -> Result<SweepReport, DriverError> {
        let cfg = self.inner.cfg.clone();
        tokio::task::spawn_blocking(move || cleanup::sweep(&cfg.cgroup_name, &cfg.state_dir))
            .await
            .map_err(|_| {
                DriverError::io("sweep", &self.inner.cfg.state_dir)(
                    std::io::ErrorKind::Interrupted.into(),
                )
            })?
    }
}

/// Overlay options are comma- and colon-separated; such paths cannot be
/// passed safely, so they are refused.
fn check_overlay_path(field: &'static str, path: &Path) -> Result<(), DriverError> {
    let text = path.to_str().ok_or(DriverError::InvalidSpec {
        field,
        reason: "is not UTF-8",
    })?;
    if !path.is_absolute() {
        return Err(DriverError::InvalidSpec {
            field,
            reason: "is not absolute",
        });
    }
    if text.contains([',', ':', '\\', '\n']) {
        return Err(DriverError::InvalidSpec {
            field,
            reason: "contains , : \\ or newline",
        });
    }
    Ok(())
}

fn validate(spec: &SandboxSpec) -> Result<(), DriverError> {
    check_overlay_path("app_dir", &spec.app_dir)?;
    crate::validate::spec(spec, f64::MAX, 4 << 20)
}
