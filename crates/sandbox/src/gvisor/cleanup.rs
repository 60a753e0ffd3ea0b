//! Crash cleanup: what a killed berth (or a killed runsc) left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::bundle::Layout;
use super::Inner;
use crate::process::cgroup::{kill_in, parents, CGROUP_ROOT};
use crate::process::cleanup;
use crate::{DriverError, SweepReport};

/// Kills and removes this driver's cgroups (every runsc process of every
/// sandbox lives in them), lets runsc forget its containers, removes the
/// state directories, and removes the empty `runsc-*` cgroups that runsc
/// leaves in every v1 hierarchy when it is killed.
pub fn sweep(inner: &Inner) -> Result<SweepReport, DriverError> {
    let cfg = &inner.cfg;
    // Processes first: `delete --force` on a live container waits for the
    // sentry (seconds); on a dead one it only drops runsc's records.
    let killed = kill_in(&sandbox_cgroups(&cfg.cgroup_name), KILL_TIMEOUT)?;
    forget_containers(inner);
    let mut report = cleanup::sweep(&cfg.cgroup_name, &cfg.state_dir)?;
    report.processes_killed += killed;
    report.cgroups_removed += remove_runsc_cgroups();
    Ok(report)
}

const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Every sandbox cgroup under the driver's parents.
fn sandbox_cgroups(cgroup_name: &str) -> Vec<PathBuf> {
    parents(cgroup_name)
        .iter()
        .filter_map(|p| fs::read_dir(p).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect()
}

/// `runsc --root R delete --force ID` for every container of every leftover
/// state directory, before the directories go.
fn forget_containers(inner: &Inner) {
    let Ok(entries) = fs::read_dir(&inner.cfg.state_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(String::from) else {
            continue;
        };
        let root = Layout::new(&inner.cfg.state_dir, &id).runsc_root();
        if !root.is_dir() {
            continue;
        }
        for container in list(inner, &root) {
            let args = ["delete", "--force", container.as_str()];
            if run(inner, &root, &args).is_none() {
                tracing::warn!(%id, %container, "runsc delete --force failed");
            }
        }
    }
}

fn list(inner: &Inner, root: &Path) -> Vec<String> {
    run(inner, root, &["list", "--quiet"])
        .map(|out| {
            out.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Runs runsc with a deadline; its stdout when it succeeded.
fn run(inner: &Inner, root: &Path, args: &[&str]) -> Option<String> {
    let mut child = Command::new(&inner.runsc)
        .arg(format!("--root={}", root.display()))
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + inner.cfg.runsc_timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                if let Some(mut stdout) = child.stdout.take() {
                    use std::io::Read as _;
                    let _ = stdout.read_to_string(&mut out);
                }
                return status.success().then_some(out);
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(?args, "runsc did not finish in time");
                return None;
            }
        }
    }
}

/// Empty `runsc-*` cgroups at the top of every v1 hierarchy and under
/// berth's own cgroup there (where a runsc started by berth would create
/// them), deepest first. Non-empty ones belong to a live runsc and stay.
fn remove_runsc_cgroups() -> usize {
    let mut removed = 0;
    let Ok(hierarchies) = fs::read_dir(CGROUP_ROOT) else {
        return 0;
    };
    for hierarchy in hierarchies.flatten() {
        let root = hierarchy.path();
        let mut places = vec![root.clone()];
        if let Some(own) = own_cgroup(&hierarchy.file_name().to_string_lossy()) {
            places.push(root.join(own.strip_prefix("/").unwrap_or(&own)));
        }
        for place in places {
            let Ok(entries) = fs::read_dir(&place) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("runsc-") {
                    removed += remove_empty_tree(&entry.path());
                }
            }
        }
    }
    removed
}

/// This process's cgroup path in the named v1 hierarchy.
fn own_cgroup(hierarchy: &str) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == hierarchy || c.strip_prefix("name=") == Some(hierarchy))
            .then(|| PathBuf::from(path))
            .filter(|p| p != Path::new("/"))
    })
}

/// Removes `dir` and its child cgroups if none holds a process.
fn remove_empty_tree(dir: &Path) -> usize {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                removed += remove_empty_tree(&entry.path());
            }
        }
    }
    let empty = fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|s| s.trim().is_empty());
    if empty && fs::remove_dir(dir).is_ok() {
        removed += 1;
    }
    removed
}
