//! The `gvisor` substrate: each sandbox is a `runsc run` of a per-session
//! OCI bundle. The agent's system calls go to gVisor's user-space kernel
//! (the sentry), not to the host's; files come through the gofer.
//!
//! runsc is told to leave cgroups alone (`--ignore-cgroups`: this host's
//! v1/v2 hybrid trips OCI runtimes, see notes/substrates.md); instead the
//! whole runsc tree (runsc, gofer, sentry, ptrace stubs) starts inside the
//! sandbox's own v1 cgroups, the same ones the process substrate uses, so
//! limits, metering and the final SIGKILL work identically.
//!
//! The channel is one end of a socketpair given to runsc as its stdin;
//! runsc hands its stdio to the container's first process, the guest in
//! `oci` mode, which moves it to fd 3 and speaks the usual preamble and
//! HTTP/2.

mod bundle;
mod cleanup;
mod live;

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::process::cgroup;
use crate::{
    ChannelLimits, Driver, DriverError, Sandbox, SandboxSpec, SubstrateReport, SweepReport,
};

const SUBSTRATE: &str = "gvisor";

/// Configuration of the gVisor driver.
#[derive(Debug, Clone)]
pub struct GvisorConfig {
    /// Where per-sandbox bundles and runsc state live.
    pub state_dir: PathBuf,
    /// The `berth-guest` executable (bind-mounted read-only into every sandbox).
    pub guest_binary: PathBuf,
    /// The runsc executable (default `runsc`, looked up in PATH).
    pub runsc: PathBuf,
    /// Platforms to try, in order; the first whose `runsc do /bin/true`
    /// succeeds within `probe_timeout` is used (default `["ptrace"]`).
    pub platforms: Vec<String>,
    /// How long one platform probe may take (default 3 s).
    pub probe_timeout: Duration,
    /// Parent cgroup name under each controller (default `berth-gvisor`).
    pub cgroup_name: String,
    /// The agent's uid inside the sandbox (default 1000). One uid serves
    /// every sandbox: it is a uid of each sandbox's own gVisor kernel, never
    /// a host uid, so sandboxes cannot meet through it.
    pub agent_uid: u32,
    /// Size of each sandbox's /tmp in MiB (default 256).
    pub tmp_size_mb: u64,
    /// Host paths mounted read-only at the same place inside.
    pub readonly_host_paths: Vec<PathBuf>,
    /// How long runsc and the guest may take to report ready (default 10 s).
    pub setup_timeout: Duration,
    /// RLIMIT_NOFILE inside (default 4096).
    pub nofile: u64,
    /// Host tasks runsc itself needs (sentry and gofer threads, ptrace
    /// stubs), added to the sandbox's `pids` limit for the host pids
    /// cgroup; the agent's own limit is RLIMIT_NPROC inside (default 512).
    pub runtime_pids: u64,
    /// Memory runsc itself needs (sentry and gofer, ~35 MiB charged per
    /// sandbox here), added to the sandbox's memory limit for the host
    /// memory cgroup so the agent gets about what it asked for (default 64).
    pub runtime_memory_mb: u64,
    /// How long a `runsc delete --force` during sweep may take (default 5 s).
    pub runsc_timeout: Duration,
    /// Limits on what the guest may send.
    pub channel: ChannelLimits,
    /// Largest chunk of agent output logged at once (default 8 KiB).
    pub max_output_chunk: usize,
}

impl GvisorConfig {
    /// Defaults for everything but the two paths.
    pub fn new(state_dir: impl Into<PathBuf>, guest_binary: impl Into<PathBuf>) -> Self {
        let process = crate::process::ProcessConfig::new("/", "/");
        GvisorConfig {
            state_dir: state_dir.into(),
            guest_binary: guest_binary.into(),
            runsc: PathBuf::from("runsc"),
            platforms: vec!["ptrace".to_string()],
            probe_timeout: Duration::from_secs(3),
            cgroup_name: "berth-gvisor".to_string(),
            agent_uid: 1000,
            tmp_size_mb: 256,
            readonly_host_paths: process.readonly_host_paths,
            setup_timeout: Duration::from_secs(10),
            nofile: 4096,
            runtime_pids: 512,
            runtime_memory_mb: 64,
            runsc_timeout: Duration::from_secs(5),
            channel: ChannelLimits::default(),
            max_output_chunk: 8 * 1024,
        }
    }
}

/// Driver for gVisor sandboxes. Cheap to clone.
#[derive(Clone)]
pub struct GvisorDriver {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: GvisorConfig,
    /// The runsc executable, resolved.
    runsc: PathBuf,
    /// The platform the probe chose.
    platform: String,
    /// Ids of live sandboxes.
    ids: Mutex<BTreeSet<String>>,
}

impl GvisorDriver {
    /// Checks the guest binary and runsc, and picks a platform (probed once
    /// per runsc and platform list, then cached for the process).
    pub fn new(cfg: GvisorConfig) -> Result<Self, DriverError> {
        crate::validate::guest_binary(&cfg.guest_binary, true)?;
        if !cfg.state_dir.is_absolute() {
            return Err(DriverError::InvalidSpec {
                field: "state_dir",
                reason: "is not absolute",
            });
        }
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(DriverError::io("create", &cfg.state_dir))?;
        let (runsc, platform) =
            choose_platform(&cfg).map_err(|reason| DriverError::Unavailable {
                substrate: SUBSTRATE,
                reason,
            })?;
        cgroup::ensure_parents(&cfg.cgroup_name)?;
        Ok(GvisorDriver {
            inner: Arc::new(Inner {
                cfg,
                runsc,
                platform,
                ids: Mutex::new(BTreeSet::new()),
            }),
        })
    }

    pub fn config(&self) -> &GvisorConfig {
        &self.inner.cfg
    }

    /// The platform runsc runs sandboxes with (e.g. `ptrace`).
    pub fn platform(&self) -> &str {
        &self.inner.platform
    }
}

#[async_trait]
impl Driver for GvisorDriver {
    fn substrate(&self) -> &'static str {
        SUBSTRATE
    }

    async fn start(&self, spec: SandboxSpec) -> Result<Sandbox, DriverError> {
        validate(&spec)?;
        live::start(self.inner.clone(), spec).await
    }

    async fn sweep(&self) -> Result<SweepReport, DriverError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || cleanup::sweep(&inner))
            .await
            .map_err(|_| {
                DriverError::io("sweep", &self.inner.cfg.state_dir)(
                    std::io::ErrorKind::Interrupted.into(),
                )
            })?
    }
}

/// Whether gVisor can run here, and with which platform (`berth doctor`).
pub fn probe(cfg: &GvisorConfig) -> SubstrateReport {
    let (available, detail) = match choose_platform(cfg) {
        Ok((runsc, platform)) => (
            true,
            format!("runsc {} with the {platform} platform", runsc.display()),
        ),
        Err(reason) => (false, reason),
    };
    SubstrateReport {
        substrate: SUBSTRATE.to_string(),
        available,
        detail,
    }
}

/// runsc and the platform list probed.
type ProbeKey = (PathBuf, Vec<String>);
/// The resolved runsc and the chosen platform, or why none works.
type ProbeResult = Result<(PathBuf, String), String>;

/// The first platform of the list that runs `/bin/true`; cached.
fn choose_platform(cfg: &GvisorConfig) -> ProbeResult {
    static CACHE: OnceLock<Mutex<HashMap<ProbeKey, ProbeResult>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (cfg.runsc.clone(), cfg.platforms.clone());
    // Held across the probe so concurrent constructors probe only once.
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = cache.get(&key) {
        return known.clone();
    }
    let result = probe_platforms(cfg);
    cache.insert(key, result.clone());
    result
}

fn probe_platforms(cfg: &GvisorConfig) -> ProbeResult {
    let runsc = resolve(&cfg.runsc)
        .ok_or_else(|| format!("{} not found (apt-get install runsc)", cfg.runsc.display()))?;
    let mut failures = Vec::new();
    for platform in &cfg.platforms {
        match probe_one(cfg, &runsc, platform) {
            Ok(()) => return Ok((runsc, platform.clone())),
            Err(why) => failures.push(format!("{platform}: {why}")),
        }
    }
    Err(format!("no runsc platform works: {}", failures.join("; ")))
}

/// `runsc --platform=P do /bin/true`, killed after `probe_timeout` (the
/// kvm platform hangs forever where KVM is nested badly).
fn probe_one(cfg: &GvisorConfig, runsc: &Path, platform: &str) -> Result<(), String> {
    let root = tempdir_in(&cfg.state_dir).map_err(|e| format!("probe dir: {e}"))?;
    let result = (|| {
        let mut child = Command::new(runsc)
            .arg(format!("--root={}", root.display()))
            .arg(format!("--platform={platform}"))
            .args(["--network=none", "--ignore-cgroups", "do", "/bin/true"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let deadline = Instant::now() + cfg.probe_timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("exited with {status}")),
                Ok(None) if Instant::now() > deadline => {
                    // The whole group: runsc, its gofer and its sentry.
                    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
                    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    return Err(format!("no answer within {:?}", cfg.probe_timeout));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
    })();
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn tempdir_in(dir: &Path) -> std::io::Result<PathBuf> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = dir.join(format!(".probe-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

/// `runsc` as given if it contains a slash, else the first match in PATH.
fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn validate(spec: &SandboxSpec) -> Result<(), DriverError> {
    crate::validate::spec(spec, f64::MAX, 4 << 20)
}

#[cfg(test)]
mod tests {
    #[test]
    fn resolves_absolute_and_path_names() {
        assert!(super::resolve(std::path::Path::new("/nonexistent/runsc")).is_none());
        assert!(super::resolve(std::path::Path::new("sh")).is_some());
    }
}
