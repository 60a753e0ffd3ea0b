//! The microVM's disk images, built with the real mke2fs and read back with
//! debugfs. Runs as root (the staged runtime is checked under `chroot`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use berth_sandbox::microvm::image::{stage_base, ImageStore};
use berth_sandbox::DriverError;

const IMPORTS: &str =
    "import json, ssl, hashlib, sqlite3, uuid, http.server, asyncio, zlib, ctypes";

fn need_tools() {
    for tool in ["mke2fs", "debugfs", "e2fsck"] {
        let found = Command::new(tool).arg("-V").output().is_ok();
        assert!(found, "{tool} (e2fsprogs) is needed by these tests");
    }
    assert!(nix::unistd::geteuid().is_root(), "these tests run as root");
}

/// Progress lines, kept for assertions.
#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl Lines {
    fn push(&self, s: &str) {
        eprintln!("  progress: {s}");
        self.0.lock().unwrap().push(s.to_owned());
    }
    fn any(&self, needle: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

/// `debugfs -R <cmd> <img>`: stdout, and whether stderr reported an error.
fn debugfs(img: &Path, cmd: &str) -> (String, String) {
    let out = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(img)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs {cmd}: {out:?}");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stat(img: &Path, path: &str) -> String {
    let (out, err) = debugfs(img, &format!("stat {path}"));
    assert!(
        !err.contains("not found") && out.contains("Inode:"),
        "{path} missing from {}: {err}",
        img.display()
    );
    out
}

fn fsck(img: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(out.status.success(), "e2fsck {}: {out:?}", img.display());
}

/// The host's libc as python loads it, resolved to its physical path.
fn host_libc() -> PathBuf {
    let out = Command::new("ldd").arg(common::PYTHON).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().find(|l| l.contains("libc.so.6 => ")).unwrap();
    let path = line
        .split(" => ")
        .nth(1)
        .unwrap()
        .split(" (")
        .next()
        .unwrap();
    std::fs::canonicalize(path).unwrap()
}

/// One base image for the whole file: building it is the slow part. The
/// store lives under the target directory (a static is never dropped, so a
/// temp dir would leak) and is emptied first, so the build is real.
fn base_image() -> &'static (PathBuf, PathBuf) {
    static BASE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BASE.get_or_init(|| {
        need_tools();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("microvm-images");
        let _ = std::fs::remove_dir_all(&dir);
        let store = ImageStore::new(&dir).unwrap();
        let lines = Lines::default();
        let start = Instant::now();
        let img = store
            .base(&common::guest_binary(), Path::new(common::PYTHON), &|s| {
                lines.push(s)
            })
            .unwrap();
        let size = std::fs::metadata(&img).unwrap();
        eprintln!(
            "base image: {} MB apparent, {} MB allocated, built in {} ms",
            size.len() >> 20,
            (size.blocks() * 512) >> 20,
            start.elapsed().as_millis()
        );
        assert!(lines.any("mke2fs"));
        (dir, img)
    })
}

#[test]
fn base_image_holds_python_the_guest_and_libc() {
    let (_dir, img) = base_image();
    fsck(img);
    assert!(stat(img, "/usr/bin/python3").contains("Type: symlink"));
    assert!(stat(img, "/usr/bin/python3.11").contains("Type: regular"));
    stat(img, "/usr/lib/python3.11/json/__init__.py");
    stat(img, "/usr/lib/python3.11/lib-dynload");
    let guest = stat(img, "/sbin/berth-guest");
    assert!(guest.contains("Mode:  0755"), "{guest}");
    assert!(guest.contains("User:     0   Group:     0"), "{guest}");
    stat(img, host_libc().to_str().unwrap());
    stat(img, "/lib64/ld-linux-x86-64.so.2");
    assert!(stat(img, "/lib").contains("Type: symlink"));
    assert!(stat(img, "/tmp").contains("Mode:  01777"));
    for dir in [
        "/proc",
        "/dev",
        "/run",
        "/app",
        "/venv",
        "/mnt/version",
        "/root",
    ] {
        assert!(stat(img, dir).contains("Type: directory"), "{dir}");
    }
    let (passwd, _) = debugfs(img, "cat /etc/passwd");
    assert!(passwd.contains("agent:x:1000:1000:"), "{passwd}");
    let (_, err) = debugfs(img, "stat /usr/lib/python3.11/test");
    assert!(err.contains("not found"), "the test suite was staged");
    let mode = std::fs::metadata(img).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

#[test]
fn base_image_cache_hit_does_not_rebuild() {
    let (dir, img) = base_image();
    let before = std::fs::metadata(img).unwrap().modified().unwrap();
    let store = ImageStore::new(dir).unwrap();
    let lines = Lines::default();
    let start = Instant::now();
    let again = store
        .base(&common::guest_binary(), Path::new(common::PYTHON), &|s| {
            lines.push(s)
        })
        .unwrap();
    eprintln!("base image cache hit in {} ms", start.elapsed().as_millis());
    assert_eq!(&again, img);
    assert!(lines.any("cached") && !lines.any("mke2fs"));
    assert_eq!(std::fs::metadata(img).unwrap().modified().unwrap(), before);
}

#[test]
fn staged_base_runs_python_under_chroot_as_the_agent_user() {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    stage_base(&common::guest_binary(), Path::new(common::PYTHON), &root).unwrap();
    let script = format!(
        "{IMPORTS}\n\
         import threading, os\n\
         t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
         assert ssl.create_default_context().cert_store_stats()['x509_ca'] > 0\n\
         sqlite3.connect(':memory:').execute('select 1')\n\
         ctypes.CDLL(None)\n\
         print('ok', os.getuid())"
    );
    let out = Command::new("/usr/sbin/chroot")
        .args(["--userspec=1000:1000"])
        .arg(&root)
        .args(["/usr/bin/python3", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "staged python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 1000");
    // The guest's libraries resolve inside the tree too.
    let out = Command::new("/usr/sbin/chroot")
        .arg(&root)
        .args(["/lib64/ld-linux-x86-64.so.2", "--list", "/sbin/berth-guest"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !listed.contains("not found"),
        "{out:?}"
    );
    // A shell and the basic tools run too (agents shell out).
    let out = Command::new("/usr/sbin/chroot")
        .args(["--userspec=1000:1000"])
        .arg(&root)
        .args(["/bin/sh", "-c", "sleep 0 && ls / >/dev/null && cat /etc/hostname 2>/dev/null; env true && echo shell-ok"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "shell-ok",
        "{out:?}"
    );
}

/// An app with a file, a subdirectory, an executable and a symlink, and a
/// venv whose python links out to the base image.
fn sample_version(dir: &Path) -> (PathBuf, PathBuf) {
    let app = dir.join("app");
    let venv = dir.join("venv");
    std::fs::create_dir_all(app.join("pkg")).unwrap();
    std::fs::write(app.join("main.py"), "print('hello from main')\n").unwrap();
    std::fs::write(app.join("pkg/__init__.py"), "").unwrap();
    std::fs::write(app.join("run.sh"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(app.join("run.sh"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(app.join("main.py"), std::fs::Permissions::from_mode(0o600)).unwrap();
    symlink("main.py", app.join("entry.py")).unwrap();
    std::fs::create_dir_all(venv.join("bin")).unwrap();
    std::fs::create_dir_all(venv.join("lib/python3.11/site-packages/dep")).unwrap();
    std::fs::write(
        venv.join("lib/python3.11/site-packages/dep/__init__.py"),
        "x = 1\n",
    )
    .unwrap();
    std::fs::write(venv.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
    symlink("/usr/bin/python3", venv.join("bin/python")).unwrap();
    symlink("python", venv.join("bin/python3")).unwrap();
    (app, venv)
}

#[test]
fn version_image_holds_app_and_venv_and_is_cached() {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    let (app, venv) = sample_version(dir.path());
    let store = ImageStore::new(dir.path().join("images")).unwrap();
    let lines = Lines::default();
    let start = Instant::now();
    let img = store
        .version(&app, Some(&venv), &|s| lines.push(s))
        .unwrap();
    eprintln!(
        "version image (small app + venv): built in {} ms",
        start.elapsed().as_millis()
    );
    fsck(&img);

    let (main, _) = debugfs(&img, "cat /app/main.py");
    assert_eq!(main, "print('hello from main')\n");
    let main_stat = stat(&img, "/app/main.py");
    assert!(
        main_stat.contains("Mode:  0644") && main_stat.contains("User:     0"),
        "{main_stat}"
    );
    assert!(stat(&img, "/app/run.sh").contains("Mode:  0755"));
    assert!(stat(&img, "/app/pkg").contains("Mode:  0755"));
    let link = stat(&img, "/venv/bin/python");
    assert!(
        link.contains("Type: symlink") && link.contains("\"/usr/bin/python3\""),
        "{link}"
    );
    assert!(stat(&img, "/venv/bin/python3").contains("\"python\""));
    assert!(stat(&img, "/app/entry.py").contains("\"main.py\""));
    let (dep, _) = debugfs(
        &img,
        "cat /venv/lib/python3.11/site-packages/dep/__init__.py",
    );
    assert_eq!(dep, "x = 1\n");

    // Same input: same path, not rebuilt.
    let before = std::fs::metadata(&img).unwrap().modified().unwrap();
    let lines = Lines::default();
    let start = Instant::now();
    let again = store
        .version(&app, Some(&venv), &|s| lines.push(s))
        .unwrap();
    eprintln!(
        "version image cache hit in {} ms",
        start.elapsed().as_millis()
    );
    assert_eq!(again, img);
    assert!(lines.any("cached") && !lines.any("mke2fs"));
    assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), before);

    // Changed content (same size): a new image; without the venv: another.
    std::fs::write(app.join("main.py"), "print('HELLO FROM MAIN')\n").unwrap();
    let changed = store.version(&app, Some(&venv), &|_| {}).unwrap();
    assert_ne!(changed, img);
    let (main, _) = debugfs(&changed, "cat /app/main.py");
    assert_eq!(main, "print('HELLO FROM MAIN')\n");
    let no_venv = store.version(&app, None, &|_| {}).unwrap();
    assert_ne!(no_venv, changed);
    let (_, err) = debugfs(&no_venv, "stat /venv");
    assert!(err.contains("not found"));

    // Eviction keeps what it is told to.
    assert_eq!(store.retain(std::slice::from_ref(&changed)).unwrap(), 2);
    assert!(changed.exists() && !img.exists() && !no_venv.exists());
}

#[test]
fn version_image_refuses_a_fifo() {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = sample_version(dir.path());
    nix::unistd::mkfifo(
        &app.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let store = ImageStore::new(dir.path().join("images")).unwrap();
    let err = store.version(&app, None, &|_| {}).unwrap_err();
    match &err {
        DriverError::Image { image, detail } => {
            assert_eq!(image, "version");
            assert!(
                detail.contains("pipe") && detail.contains("fifo"),
                "{detail}"
            );
        }
        other => panic!("want DriverError::Image, got {other:?}"),
    }
    // Nothing half-built is left behind.
    let left: Vec<_> = std::fs::read_dir(store.dir()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn version_image_respects_the_size_limit() {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    let (app, venv) = sample_version(dir.path());
    let store = ImageStore::new(dir.path().join("images"))
        .unwrap()
        .with_limits(berth_sandbox::microvm::image::ImageLimits {
            max_version_bytes: 16,
            ..Default::default()
        });
    let err = store.version(&app, Some(&venv), &|_| {}).unwrap_err();
    assert!(
        matches!(&err, DriverError::Image { detail, .. } if detail.contains("limit")),
        "{err}"
    );
}

#[test]
fn concurrent_builds_of_one_version_agree() {
    need_tools();
    let dir = tempfile::tempdir().unwrap();
    let (app, venv) = sample_version(dir.path());
    let store = ImageStore::new(dir.path().join("images")).unwrap();
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| store.version(&app, Some(&venv), &|_| {}).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    fsck(&paths[0]);
    let names: Vec<_> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}
