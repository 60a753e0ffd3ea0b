//! cgroup v1 (this kernel's controllers live there): one directory per
//! controller per sandbox, under `<controller>/<cgroup_name>/<sandbox_id>`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{DriverError, Limits, SandboxUsage};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "cpuacct"];
const CFS_PERIOD_US: u64 = 100_000;

/// The cgroup directories of one sandbox.
#[derive(Debug, Clone)]
pub struct Cgroups {
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
}

fn write(path: &Path, value: impl ToString) -> Result<(), DriverError> {
    fs::write(path, value.to_string()).map_err(|source| DriverError::Cgroup {
        path: path.to_path_buf(),
        source,
    })
}

fn read_u64(path: &Path) -> Result<u64, DriverError> {
    let text = fs::read_to_string(path).map_err(|source| DriverError::Cgroup {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| DriverError::Cgroup {
        path: path.to_path_buf(),
        source: std::io::ErrorKind::InvalidData.into(),
    })
}

/// The parent directory `<controller>/<name>` of every controller.
pub fn parents(name: &str) -> Vec<PathBuf> {
    CONTROLLERS
        .iter()
        .map(|c| Path::new(CGROUP_ROOT).join(c).join(name))
        .collect()
}

/// Creates the parent directories (idempotent).
pub fn ensure_parents(name: &str) -> Result<(), DriverError> {
    for dir in parents(name) {
        fs::create_dir_all(&dir).map_err(|source| DriverError::Cgroup { path: dir, source })?;
    }
    Ok(())
}

impl Cgroups {
    pub fn new(name: &str, id: &str) -> Self {
        let dir = |c: &str| Path::new(CGROUP_ROOT).join(c).join(name).join(id);
        Cgroups {
            memory: dir("memory"),
            pids: dir("pids"),
            cpu: dir("cpu"),
            cpuacct: dir("cpuacct"),
        }
    }

    /// Distinct directories (cpu and cpuacct may be one hierarchy).
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut seen = BTreeSet::new();
        [&self.memory, &self.pids, &self.cpu, &self.cpuacct]
            .into_iter()
            .filter(|d| seen.insert(fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf())))
            .cloned()
            .collect()
    }

    /// Creates the directories and writes the limits.
    pub fn create(&self, limits: &Limits) -> Result<(), DriverError> {
        for dir in [&self.memory, &self.pids, &self.cpu, &self.cpuacct] {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(DriverError::Cgroup {
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
        write(
            &self.memory.join("memory.limit_in_bytes"),
            limits.memory_bytes,
        )?;
        // Without swap accounting a sandbox could push its memory to swap.
        let memsw = self.memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write(&memsw, limits.memory_bytes)?;
        }
        write(&self.pids.join("pids.max"), limits.pids)?;
        let quota = (limits.vcpus * CFS_PERIOD_US as f64).round().max(1000.0) as u64;
        write(&self.cpu.join("cpu.cfs_period_us"), CFS_PERIOD_US)?;
        write(&self.cpu.join("cpu.cfs_quota_us"), quota)
    }

    /// The `cgroup.procs` files the guest joins.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Every pid in any of the sandbox's cgroups.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.dirs())
    }

    pub fn usage(&self) -> Result<SandboxUsage, DriverError> {
        let cpu_ns = read_u64(&self.cpuacct.join("cpuacct.usage"))?;
        Ok(SandboxUsage {
            cpu_seconds: cpu_ns as f64 / 1e9,
            memory_bytes: read_u64(&self.memory.join("memory.usage_in_bytes"))?,
            peak_memory_bytes: read_u64(&self.memory.join("memory.max_usage_in_bytes"))?,
        })
    }

    /// Destroys a sandbox whose handle was dropped without `terminate`:
    /// every process gets SIGKILL at once (a `Drop` may run while the
    /// runtime shuts down, when a spawned task would never run), then
    /// `destroy` removes the rest on the runtime if there is one, or the
    /// cgroups are emptied here.
    pub fn destroy_on_drop<F>(&self, name: &str, destroy: F)
    where
        F: std::future::Future<Output = Result<SandboxUsage, DriverError>> + Send + 'static,
    {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let name = name.to_owned();
                handle.spawn(async move {
                    if let Err(e) = destroy.await {
                        tracing::error!(sandbox = %name, error = %e, "destroy on drop");
                    }
                });
            }
            Err(_) => {
                let _ = self.kill_all(Duration::from_secs(10));
            }
        }
    }

    /// SIGKILLs every process until the cgroups are empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<usize, DriverError> {
        kill_in(&self.dirs(), timeout)
    }

    /// Removes the directories; retries while dying tasks are released.
    pub fn remove(&self, timeout: Duration) -> Result<(), DriverError> {
        for dir in self.dirs() {
            rmdir_retry(&dir, timeout)?;
        }
        Ok(())
    }
}

fn pids_in(dirs: &[PathBuf]) -> Vec<u32> {
    let mut pids = BTreeSet::new();
    for dir in dirs {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids.into_iter().collect()
}

/// Kills every process in `dirs` until none is left; returns how many
/// signals were sent. Repeats because a process may fork while we kill.
pub fn kill_in(dirs: &[PathBuf], timeout: Duration) -> Result<usize, DriverError> {
    let deadline = Instant::now() + timeout;
    let mut sent = 0;
    loop {
        let pids = pids_in(dirs);
        if pids.is_empty() {
            return Ok(sent);
        }
        if Instant::now() > deadline {
            return Err(DriverError::KillTimeout(dirs[0].clone()));
        }
        for pid in pids {
            if kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
                sent += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn rmdir_retry(dir: &Path, timeout: Duration) -> Result<(), DriverError> {
    let deadline = Instant::now() + timeout;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) if Instant::now() > deadline => {
                return Err(DriverError::Cgroup {
                    path: dir.to_path_buf(),
                    source,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}
