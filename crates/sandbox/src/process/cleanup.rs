//! Mount-table inspection and crash cleanup (`sweep`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{umount2, MntFlags};

use super::cgroup::{kill_in, parents, rmdir_retry};
use crate::{DriverError, SweepReport};

/// Mount points in `/proc/self/mountinfo`, octal escapes decoded.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Detaches every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) -> Result<usize, DriverError> {
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in &mounts {
        umount2(m, MntFlags::MNT_DETACH).map_err(|errno| DriverError::Unmount {
            path: m.clone(),
            errno,
        })?;
    }
    Ok(mounts.len())
}

/// Kills and removes every sandbox cgroup under `cgroup_name`, unmounts and
/// removes everything in `state_dir`.
pub fn sweep(cgroup_name: &str, state_dir: &Path) -> Result<SweepReport, DriverError> {
    let mut report = SweepReport::default();
    let mut children: Vec<PathBuf> = Vec::new();
    for parent in parents(cgroup_name) {
        let Ok(entries) = fs::read_dir(&parent) else {
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
    report.mounts_removed = unmount_under(state_dir)?;
    if let Ok(entries) = fs::read_dir(state_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            fs::remove_dir_all(&path).map_err(DriverError::io("remove state dir", &path))?;
            report.state_dirs_removed += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(super::unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(super::unescape(r"/plain"), "/plain");
        assert_eq!(super::unescape(r"/bad\9"), r"/bad\9");
    }
}
