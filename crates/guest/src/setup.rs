//! Setup: cgroups, namespaces, the root filesystem, privileges. Runs in a
//! fresh single-threaded process started by the host as root.

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, pivot_root, setgroups, setresgid, setresuid, ForkResult, Gid, Pid, Uid};

use crate::proto::{GuestSpec, SetupFailure, FAILED_PREFIX};
use crate::{seccomp, sys};

/// A failed setup step: which stage and the errno of the failing call.
#[derive(Debug)]
pub struct Fail {
    pub stage: &'static str,
    pub errno: Errno,
}

pub trait At<T> {
    fn at(self, stage: &'static str) -> Result<T, Fail>;
}

impl<T> At<T> for Result<T, Errno> {
    fn at(self, stage: &'static str) -> Result<T, Fail> {
        self.map_err(|errno| Fail { stage, errno })
    }
}

impl<T> At<T> for std::io::Result<T> {
    fn at(self, stage: &'static str) -> Result<T, Fail> {
        self.map_err(|e| Fail {
            stage,
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })
    }
}

/// Reports a failure on the channel and on stderr, then exits.
pub fn fail(f: Fail) -> ! {
    let report = SetupFailure {
        stage: f.stage.to_string(),
        errno: f.errno as i32,
    };
    eprintln!("berth-guest: setup failed at {}: {}", f.stage, f.errno);
    if let Ok(json) = serde_json::to_string(&report) {
        let _ = sys::write_channel(format!("{FAILED_PREFIX}{json}\n").as_bytes());
    }
    std::process::exit(125)
}

/// Joins the cgroups and the new namespaces, then forks. Returns in the
/// child, which is pid 1 of the new pid namespace; the parent never returns.
pub fn enter_namespaces(spec: &GuestSpec) -> Result<(), Fail> {
    let me = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        fs::write(procs, &me).at("join-cgroup")?;
    }
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWCGROUP;
    unshare(flags).at("unshare")?;
    match sys::fork().at("fork")? {
        ForkResult::Child => Ok(()),
        ForkResult::Parent { child } => wait_parent(spec, child),
    }
}

/// The parent stays outside the pid namespace only to report the child's
/// exit to the host. It sits in the sandbox's cgroups, so it gives up its
/// privileges and takes the same filter as everything else in there.
fn wait_parent(spec: &GuestSpec, child: Pid) -> ! {
    let _ = nix::unistd::close(crate::proto::CHANNEL_FD);
    if let Err(f) = drop_privileges(spec).and_then(|()| lock_down()) {
        eprintln!(
            "berth-guest: parent lock-down failed at {}: {}",
            f.stage, f.errno
        );
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => std::process::exit(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => std::process::exit(125),
        }
    }
}

/// Everything pid 1 does before it serves: filesystem, network, identity.
pub fn build_sandbox(spec: &GuestSpec) -> Result<(), Fail> {
    crate::rootfs::build(spec)?;
    sys::loopback_up().at("loopback")?;
    nix::unistd::sethostname("berth").at("hostname")?;
    set_rlimits(spec)?;
    drop_privileges(spec)?;
    lock_down()
}

pub(crate) fn set_rlimits(spec: &GuestSpec) -> Result<(), Fail> {
    setrlimit(Resource::RLIMIT_NOFILE, spec.nofile, spec.nofile).at("rlimit-nofile")?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).at("rlimit-core")?;
    // The uid belongs to this sandbox alone, so a per-uid process cap is a
    // second fence behind pids.max.
    setrlimit(Resource::RLIMIT_NPROC, spec.nproc, spec.nproc).at("rlimit-nproc")
}

/// Becomes the session uid: no groups, no capabilities (a non-zero uid
/// after setresuid clears the permitted and effective sets).
pub(crate) fn drop_privileges(spec: &GuestSpec) -> Result<(), Fail> {
    setgroups(&[]).at("setgroups")?;
    let gid = Gid::from_raw(spec.gid);
    setresgid(gid, gid, gid).at("setresgid")?;
    let uid = Uid::from_raw(spec.uid);
    setresuid(uid, uid, uid).at("setresuid")?;
    if capabilities_effective().at("capabilities")? != 0 {
        return Err(Fail {
            stage: "capabilities",
            errno: Errno::EPERM,
        });
    }
    Ok(())
}

/// no_new_privs, not dumpable (so the agent cannot open /proc/1/{mem,exe,
/// root} of the guest), and the seccomp filter.
pub(crate) fn lock_down() -> Result<(), Fail> {
    nix::sys::prctl::set_no_new_privs().at("no-new-privs")?;
    nix::sys::prctl::set_dumpable(false).at("dumpable")?;
    seccomp::install().map_err(|e| Fail {
        stage: "seccomp",
        errno: match e {
            seccompiler::Error::Seccomp(errno) => {
                Errno::from_raw(errno.raw_os_error().unwrap_or(libc::EINVAL))
            }
            _ => Errno::EINVAL,
        },
    })
}

fn capabilities_effective() -> std::io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or(std::io::ErrorKind::InvalidData)?;
    u64::from_str_radix(line.trim(), 16).map_err(|_| std::io::ErrorKind::InvalidData.into())
}

/// Creates `path` (a directory) with mode 0755 and its parents.
pub fn mkdirs(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
}

pub fn mount_at(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Errno> {
    // Pseudo filesystems get their type as the source name, as mount(8) does.
    let src = src.or(fstype.map(Path::new));
    mount(src, dst, fstype, flags, data)
}

/// pivot_root into `root`, detach the old root, and make `/` read-only.
pub fn pivot(root: &Path) -> Result<(), Fail> {
    chdir(root).at("chdir-root")?;
    mkdirs(&root.join(".old")).at("mkdir-old-root")?;
    pivot_root(".", ".old").at("pivot-root")?;
    chdir("/").at("chdir-new-root")?;
    umount2("/.old", MntFlags::MNT_DETACH).at("umount-old-root")?;
    fs::remove_dir("/.old").at("rmdir-old-root")?;
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    let flags = ro | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount::<str, str, str, str>(None, "/", None, flags, None).at("remount-root-ro")?;
    chdir("/app").at("chdir-app")
}

/// Host symlinks at the top of `/` (usrmerge) recreated inside.
pub fn copy_root_symlinks(root: &Path) -> Result<(), Fail> {
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = PathBuf::from("/").join(name);
        if let Ok(target) = fs::read_link(&host) {
            symlink(target, root.join(name)).at("symlink-root")?;
        }
    }
    Ok(())
}
