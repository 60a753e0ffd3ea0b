//! The sandbox's root filesystem, built on a small tmpfs and entered with
//! pivot_root: read-only host runtime, a generated /etc, an overlay /app,
//! private /tmp, fresh /proc, a minimal /dev, and no /sys.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use nix::mount::MsFlags;

use crate::proto::GuestSpec;
use crate::setup::{copy_root_symlinks, mkdirs, mount_at, pivot, At, Fail};

const ROOT_TMPFS: &str = "size=16m,mode=0755";
const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom"];

pub fn build(spec: &GuestSpec) -> Result<(), Fail> {
    // Nothing we mount may propagate back to the host's mount namespace.
    let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
    mount_at(None, Path::new("/"), None, private, None).at("make-rprivate")?;
    let root = spec.root_dir.as_path();
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_at(None, root, Some("tmpfs"), flags, Some(ROOT_TMPFS)).at("mount-root")?;
    for dir in ["etc", "app", "tmp", "proc", "dev"] {
        mkdirs(&root.join(dir)).at("mkdir-root")?;
    }
    copy_root_symlinks(root)?;
    write_etc(spec, root)?;
    for host in &spec.readonly_host_paths {
        bind_host_path(host, root)?;
    }
    mount_app(spec, root)?;
    if let Some(venv) = &spec.venv_dir {
        let dst = root.join("venv");
        mkdirs(&dst).at("mkdir-venv")?;
        bind_readonly(venv, &dst).at("bind-venv")?;
    }
    let tmp = format!("size={}m,mode=1777", spec.tmp_size_mb);
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_at(None, &root.join("tmp"), Some("tmpfs"), flags, Some(&tmp)).at("mount-tmp")?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let proc = Some(Path::new("proc"));
    mount_at(proc, &root.join("proc"), Some("proc"), flags, None).at("mount-proc")?;
    build_dev(&root.join("dev"))?;
    pivot(root)
}

/// Bind-mounts `src` read-only (and nosuid, nodev) at `dst`.
fn bind_readonly(src: &Path, dst: &Path) -> Result<(), nix::errno::Errno> {
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount_at(Some(src), dst, None, bind, None)?;
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount_at(
        None,
        dst,
        None,
        ro | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )
}

/// Mounts a host path at the same place inside, if it exists on the host.
fn bind_host_path(host: &Path, root: &Path) -> Result<(), Fail> {
    let Ok(meta) = fs::metadata(host) else {
        return Ok(());
    };
    let rel = host.strip_prefix("/").unwrap_or(host);
    let dst = root.join(rel);
    if meta.is_dir() {
        mkdirs(&dst).at("mkdir-host-path")?;
    } else {
        if let Some(parent) = dst.parent() {
            mkdirs(parent).at("mkdir-host-path")?;
        }
        fs::write(&dst, b"").at("touch-host-path")?;
    }
    bind_readonly(host, &dst).at("bind-host-path")
}

/// A private writable /app: the version's directory as the read-only lower
/// layer, the sandbox's own upper layer (owned by the session uid).
/// `volatile`: the upper layer is thrown away with the sandbox, so the
/// syncfs of the whole upper filesystem at unmount (seconds on a busy disk)
/// buys nothing.
fn mount_app(spec: &GuestSpec, root: &Path) -> Result<(), Fail> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},volatile",
        spec.app_dir.display(),
        spec.upper_dir.display(),
        spec.work_dir.display()
    );
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let src = Some(Path::new("overlay"));
    mount_at(src, &root.join("app"), Some("overlay"), flags, Some(&opts)).at("mount-app")
}

fn write_etc(spec: &GuestSpec, root: &Path) -> Result<(), Fail> {
    let etc = root.join("etc");
    let (uid, gid) = (spec.uid, spec.gid);
    let passwd = format!(
        "root:x:0:0:root:/root:/usr/sbin/nologin\n\
         agent:x:{uid}:{gid}:agent:/tmp:/usr/sbin/nologin\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    );
    let group = format!("root:x:0:\nagent:x:{gid}:\nnogroup:x:65534:\n");
    let files = [
        ("passwd", passwd),
        ("group", group),
        ("hostname", "berth\n".to_string()),
        (
            "hosts",
            "127.0.0.1 localhost berth\n::1 localhost\n".to_string(),
        ),
    ];
    for (name, content) in files {
        fs::write(etc.join(name), content).at("write-etc")?;
    }
    Ok(())
}

/// A tmpfs /dev with the harmless character devices bound from the host,
/// a private /dev/shm, and the /proc/self/fd links.
fn build_dev(dev: &Path) -> Result<(), Fail> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_at(None, dev, Some("tmpfs"), flags, Some("size=64k,mode=0755")).at("mount-dev")?;
    for node in DEV_NODES {
        let dst = dev.join(node);
        fs::write(&dst, b"").at("touch-dev-node")?;
        let src = Path::new("/dev").join(node);
        let bind = MsFlags::MS_BIND;
        mount_at(Some(src.as_path()), &dst, None, bind, None).at("bind-dev-node")?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, target) in links {
        symlink(target, dev.join(name)).at("symlink-dev")?;
    }
    let shm = dev.join("shm");
    mkdirs(&shm).at("mkdir-shm")?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_at(None, &shm, Some("tmpfs"), flags, Some("size=64m,mode=1777")).at("mount-shm")?;
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    mount_at(None, dev, None, ro | flags, None).at("remount-dev-ro")
}
