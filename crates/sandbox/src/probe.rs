//! Host capability report for `berth doctor`: what the process substrate
//! (and the others) can rely on on this machine.

use std::path::Path;

use serde::Serialize;

use crate::process::{CGROUP_ROOT, CONTROLLERS};

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub running_as_root: bool,
    /// Namespace kinds present in /proc/self/ns.
    pub namespaces: Vec<NamespaceSupport>,
    pub cgroup_v1: Vec<ControllerSupport>,
    /// The v2 hierarchy is mounted (at /sys/fs/cgroup/unified or /sys/fs/cgroup).
    pub cgroup_v2_mounted: bool,
    /// Controllers enabled at the v2 root.
    pub cgroup_v2_controllers: Vec<String>,
    /// `Seccomp:` field exists in /proc/self/status (filter mode available).
    pub seccomp: bool,
    /// Landlock ABI version, or None when Landlock is unavailable.
    pub landlock_abi: Option<i64>,
    pub kvm_openable: bool,
    pub overlayfs: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NamespaceSupport {
    pub kind: &'static str,
    pub present: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControllerSupport {
    pub name: &'static str,
    pub present: bool,
    /// The root of the hierarchy accepts a new child cgroup.
    pub writable: bool,
}

pub fn probe() -> HostReport {
    HostReport {
        running_as_root: nix::unistd::geteuid().is_root(),
        namespaces: ["user", "pid", "net", "mnt", "ipc", "uts", "cgroup"]
            .into_iter()
            .map(|kind| NamespaceSupport {
                kind,
                present: Path::new("/proc/self/ns").join(kind).exists(),
            })
            .collect(),
        cgroup_v1: CONTROLLERS.iter().map(|c| controller(c)).collect(),
        cgroup_v2_mounted: v2_root().is_some(),
        cgroup_v2_controllers: v2_root()
            .and_then(|r| std::fs::read_to_string(Path::new(r).join("cgroup.controllers")).ok())
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default(),
        seccomp: std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Seccomp:"))),
        landlock_abi: landlock_abi(),
        kvm_openable: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        overlayfs: std::fs::read_to_string("/proc/filesystems")
            .is_ok_and(|s| s.lines().any(|l| l.ends_with("\toverlay"))),
    }
}

fn v2_root() -> Option<&'static str> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| Path::new(p).join("cgroup.controllers").exists())
}

fn controller(name: &'static str) -> ControllerSupport {
    let root = Path::new(CGROUP_ROOT).join(name);
    let present = root.join("cgroup.procs").exists();
    let probe = root.join(format!("berth-probe-{}", std::process::id()));
    let writable = present && std::fs::create_dir(&probe).is_ok();
    if writable {
        let _ = std::fs::remove_dir(&probe);
    }
    ControllerSupport {
        name,
        present,
        writable,
    }
}

/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`.
fn landlock_abi() -> Option<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer and size 0 and the VERSION flag,
    // the kernel reads no memory and only returns the ABI version.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (rc > 0).then_some(rc)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reports_this_machine() {
        let report = super::probe();
        assert!(report.namespaces.iter().all(|n| n.present), "{report:?}");
        assert!(report.seccomp);
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("landlock_abi"));
    }
}
