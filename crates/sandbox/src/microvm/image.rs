//! Disk images the microVM boots.
//!
//! Two kinds, both ext4 built by `mke2fs -d` from a staging directory (no loop
//! devices, no mounts, no journal), both attached read-only:
//!
//! - the **base image** (`base-<hash>.ext4`), the guest's `/` (`root=/dev/vda`):
//!   the guest binary as `/sbin/berth-guest` (the kernel runs it as init), the
//!   runtime closure of one Python interpreter at the paths it has on the host,
//!   and a few generated files in `/etc`;
//! - the **version image** (`version-<hash>.ext4`): one agent version's `app/`
//!   and, when it has one, `venv/`.
//!
//! Images are content-addressed: the name carries a SHA-256 of everything that
//! goes in plus [`FORMAT_VERSION`], so equal input finds the image already
//! built and changed input gets a new one. "Everything" is every path, mode and
//! symlink target, and for files:
//! - base image: the bytes of the guest binary and of the generated files; every
//!   host runtime file by its identity (path, size, mtime, inode) instead of its
//!   bytes. The runtime is ~50 MB of distribution files that the package
//!   manager replaces (new inode) rather than edits, and hashing it on every
//!   call would make a cache hit cost more than a lookup should.
//! - version image: the bytes of every file.
//!
//! Every file is written under a temporary name in the store and published
//! with `link(2)`, which never replaces an existing name: two concurrent builds
//! of the same key both succeed and leave one complete image.
//!
//! The builders block (they copy files and run `mke2fs`); call them from a
//! blocking thread.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::{DriverError, Progress};

/// Version of the image layout and of the builder; part of every image's
/// hash, so changing what goes into an image (or how) means bumping it.
pub const FORMAT_VERSION: u32 = 3;

/// Where the guest binary goes in the base image.
pub const GUEST_PATH: &str = "/sbin/berth-guest";

/// Uid and gid of the `agent` user in the base image's `/etc/passwd`.
pub const AGENT_UID: u32 = 1000;

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;
const MIB: u64 = 1 << 20;
/// Symlink loops on the host end here, as in the kernel's `MAXSYMLINKS`.
const MAX_SYMLINK_HOPS: u32 = 40;
const BUILD_PREFIX: &str = ".build-";

/// `root` and `agent` (uid/gid 1000: the VM substrate runs the agent as that
/// user) plus `nobody` for ids that map to nothing.
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
agent:x:1000:1000:berth agent:/tmp:/sbin/nologin\n\
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nagent:x:1000:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n";

/// Empty directories of the base image: mount points for the guest and
/// `/mnt/version`, where it mounts the version image.
const EMPTY_DIRS: &[(&str, u32)] = &[
    ("proc", 0o755),
    ("sys", 0o755),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("app", 0o755),
    ("venv", 0o755),
    ("mnt/version", 0o755),
    ("root", 0o700),
];

/// Asks the interpreter where its standard library is (`-I -S`: without site
/// packages) and where OpenSSL looks for CA certificates.
const PYTHON_PROBE: &str = "\
import sys
for p in sys.path:
    print('path', p, sep='\\t')
try:
    import ssl
    v = ssl.get_default_verify_paths()
    print('ssl', v.openssl_cafile, sep='\\t')
    print('ssl', v.openssl_capath, sep='\\t')
except Exception:
    pass
";

/// Limits on what a version image may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Total bytes of the files of `app_dir` and `venv_dir`. Default 4 GiB.
    pub max_version_bytes: u64,
    /// Files, directories and symlinks of `app_dir` and `venv_dir`.
    /// Default 1,000,000.
    pub max_version_entries: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_version_bytes: 4 << 30,
            max_version_entries: 1_000_000,
        }
    }
}

/// A directory of content-addressed ext4 images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    limits: ImageLimits,
}

impl ImageStore {
    /// Opens (creating, mode 0755) the store at `dir` and removes what builds
    /// of dead processes left behind.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, DriverError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(DriverError::io("create", &dir))?;
        fs::set_permissions(&dir, Permissions::from_mode(0o755))
            .map_err(DriverError::io("chmod", &dir))?;
        let store = ImageStore {
            dir,
            limits: ImageLimits::default(),
        };
        store.sweep_dead_builds()?;
        Ok(store)
    }

    pub fn with_limits(mut self, limits: ImageLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The base image for this guest binary and interpreter: ext4, for
    /// read-only use, mounted by the guest kernel as `/` (`root=/dev/vda`).
    ///
    /// Holds, at their host paths: `python` with its symlink chain, the
    /// directories of its `sys.path` (without site packages, tests, idlelib,
    /// tkinter, ensurepip, `config-*` and optimized `.pyc`), every shared
    /// library the interpreter, its extension modules and the guest need (found
    /// with the dynamic loader's `--list`), the loader itself, `libgcc_s`
    /// (which glibc opens at run time for thread cancellation), OpenSSL's CA
    /// bundle and `/etc/localtime` when the host has them, and the host's
    /// usrmerge links (`/bin -> usr/bin`, ...). Also `/sbin/berth-guest`
    /// (0755), `/etc/passwd` and `/etc/group` (`root`, and `agent` with uid and
    /// gid [`AGENT_UID`]), `/etc/hosts`, `/etc/nsswitch.conf`, and the empty
    /// directories `/proc /sys /dev /tmp /run /app /venv /mnt/version /root`.
    /// Everything is owned by root; files are 0644 or 0755, directories 0755.
    pub fn base(
        &self,
        guest_binary: &Path,
        python: &Path,
        progress: Progress<'_>,
    ) -> Result<PathBuf, DriverError> {
        progress(&format!(
            "base image: resolving the runtime of {}",
            python.display()
        ));
        let tree = plan_base(guest_binary, python)?;
        self.build(&tree, progress)
    }

    /// The version image: ext4 with a top-level `app/` (a copy of `app_dir`)
    /// and, when given, `venv/` (a copy of `venv_dir`). Symlinks are kept as
    /// they are (`venv/bin/python -> /usr/bin/python3` stays a link);
    /// directories become 0755, files 0755 when any execute bit is set and
    /// 0644 otherwise, all owned by root. Device files, fifos and sockets are
    /// refused.
    pub fn version(
        &self,
        app_dir: &Path,
        venv_dir: Option<&Path>,
        progress: Progress<'_>,
    ) -> Result<PathBuf, DriverError> {
        let tree = plan_version(app_dir, venv_dir, &self.limits)?;
        self.build(&tree, progress)
    }

    /// Removes every image of the store not in `keep` and returns how many it
    /// removed. Must not run concurrently with a build whose result is not in
    /// `keep` yet.
    pub fn retain(&self, keep: &[PathBuf]) -> Result<usize, DriverError> {
        let keep: BTreeSet<&OsStr> = keep.iter().filter_map(|p| p.file_name()).collect();
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).map_err(DriverError::io("read", &self.dir))? {
            let entry = entry.map_err(DriverError::io("read", &self.dir))?;
            let name = entry.file_name();
            if Kind::of_file_name(&name).is_some() && !keep.contains(name.as_os_str()) {
                let path = entry.path();
                fs::remove_file(&path).map_err(DriverError::io("remove", &path))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn build(&self, tree: &Tree, progress: Progress<'_>) -> Result<PathBuf, DriverError> {
        let kind = tree.kind;
        let name = format!("{}-{}.ext4", kind.name(), &hex(&tree.key(kind))[..32]);
        let path = self.dir.join(&name);
        if path.exists() {
            progress(&format!("{} image {name}: cached", kind.name()));
            return Ok(path);
        }
        let start = Instant::now();
        let stats = tree.stats();
        let tmp = Scratch(self.dir.join(scratch_name(kind)));
        let staging = Scratch(tmp.0.with_extension("d"));
        progress(&format!(
            "{} image: staging {} files, {} MB",
            kind.name(),
            stats.files,
            stats.file_bytes.div_ceil(MIB)
        ));
        tree.stage(&staging.0)?;
        let (bytes, inodes) = stats.geometry();
        progress(&format!(
            "{} image: mke2fs, {} MB, {inodes} inodes",
            kind.name(),
            bytes / MIB
        ));
        mke2fs(kind, &staging.0, &tmp.0, bytes, inodes)?;
        drop(staging);
        publish(&tmp.0, &path)?;
        progress(&format!(
            "{} image {name}: built in {} ms",
            kind.name(),
            start.elapsed().as_millis()
        ));
        Ok(path)
    }

    /// Removes `.build-<pid>-*` scratch files whose process is gone (a crash
    /// mid-build); those of live processes may be builds in progress.
    fn sweep_dead_builds(&self) -> Result<(), DriverError> {
        for entry in fs::read_dir(&self.dir).map_err(DriverError::io("read", &self.dir))? {
            let entry = entry.map_err(DriverError::io("read", &self.dir))?;
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(BUILD_PREFIX))
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new("/proc").join(pid.to_string()).exists() {
                drop(Scratch(entry.path()));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Base,
    Version,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::Version => "version",
        }
    }

    /// The ext4 volume label (at most 16 bytes).
    fn label(self) -> &'static str {
        match self {
            Kind::Base => "berth-base",
            Kind::Version => "berth-version",
        }
    }

    fn of_file_name(name: &OsStr) -> Option<Kind> {
        let name = name.to_str()?.strip_suffix(".ext4")?;
        [Kind::Base, Kind::Version].into_iter().find(|k| {
            name.strip_prefix(k.name())
                .is_some_and(|h| h.starts_with('-'))
        })
    }
}

fn image_err(kind: Kind, detail: impl Into<String>) -> DriverError {
    DriverError::Image {
        image: kind.name().to_owned(),
        detail: detail.into(),
    }
}

/// A unique name for one build's scratch files: pid (for the sweep) and a
/// per-process counter.
fn scratch_name(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{BUILD_PREFIX}{}-{n}-{}.tmp",
        std::process::id(),
        kind.name()
    )
}

/// A scratch file or directory, removed when dropped (on success and on
/// every error path alike).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.0) {
            Ok(md) if md.is_dir() => drop(fs::remove_dir_all(&self.0)),
            Ok(_) => drop(fs::remove_file(&self.0)),
            Err(_) => {}
        }
    }
}

/// Makes the finished image durable and gives it its name. `link` fails
/// rather than replace: if a concurrent build of the same key got there
/// first, its image (identical content) stays and ours is dropped.
fn publish(tmp: &Path, path: &Path) -> Result<(), DriverError> {
    fs::set_permissions(tmp, Permissions::from_mode(0o644))
        .map_err(DriverError::io("chmod", tmp))?;
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(DriverError::io("sync", tmp))?;
    match fs::hard_link(tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(DriverError::io("link", path)(e)),
    }
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(DriverError::io("sync", dir))?;
    }
    Ok(())
}

fn mke2fs(
    kind: Kind,
    staging: &Path,
    out: &Path,
    bytes: u64,
    inodes: u64,
) -> Result<(), DriverError> {
    let output = Command::new("mke2fs")
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
        ])
        // Read-only images: no journal, never resized.
        .args(["-O", "^has_journal,^resize_inode"])
        .args(["-E", "root_owner=0:0", "-L", kind.label()])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-d")
        .arg(staging)
        .arg(out)
        .arg(format!("{}k", bytes / 1024))
        .env_remove("MKE2FS_CONFIG")
        .output()
        .map_err(|e| image_err(kind, format!("running mke2fs (e2fsprogs): {e}")))?;
    if !output.status.success() {
        return Err(image_err(
            kind,
            format!(
                "mke2fs exited with {}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The tree: what goes into an image, before anything is copied.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    Symlink { target: PathBuf },
    File { src: Source, mode: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A host runtime file, keyed by identity (see the module doc).
    Host {
        path: PathBuf,
        size: u64,
        mtime: (i64, i64),
        ino: u64,
    },
    /// A file keyed by its contents, checked again while it is copied.
    Hashed {
        path: PathBuf,
        size: u64,
        digest: [u8; 32],
    },
    Generated(Vec<u8>),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Host { size, .. } | Source::Hashed { size, .. } => *size,
            Source::Generated(b) => b.len() as u64,
        }
    }
}

/// An image's content: paths relative to the image root, parents first
/// (`Path`'s order compares component by component).
#[derive(Debug)]
struct Tree {
    kind: Kind,
    nodes: BTreeMap<PathBuf, Node>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Stats {
    files: u64,
    file_bytes: u64,
    /// Data blocks: file contents, one per directory and per long symlink.
    blocks: u64,
    /// Bytes of directory entries.
    dirent_bytes: u64,
    nodes: u64,
}

impl Stats {
    /// Image size and inode count: content plus 10% and 16 MiB of slack for
    /// ext4's own metadata (group descriptors, bitmaps, inode tables, extent
    /// blocks). The file is sparse, so slack costs no disk.
    fn geometry(&self) -> (u64, u64) {
        let inodes = self.nodes + self.nodes / 10 + 64;
        let data = (self.blocks + self.dirent_bytes.div_ceil(BLOCK)) * BLOCK;
        let bytes = data + data / 10 + inodes * INODE_SIZE + 16 * MIB;
        (bytes.div_ceil(MIB) * MIB, inodes)
    }
}

impl Tree {
    fn new(kind: Kind) -> Self {
        Tree {
            kind,
            nodes: BTreeMap::new(),
        }
    }

    fn err(&self, detail: impl Into<String>) -> DriverError {
        image_err(self.kind, detail)
    }

    /// Adds `node` at `rel` and any missing parent directories (0755).
    /// Adding the same node twice is fine; anything else at a taken path is a
    /// conflict.
    fn insert(&mut self, rel: &Path, node: Node) -> Result<(), DriverError> {
        let mut parent = PathBuf::new();
        for c in rel.parent().into_iter().flat_map(Path::components) {
            parent.push(c);
            match self.nodes.get(&parent) {
                None => drop(self.nodes.insert(parent.clone(), Node::Dir { mode: 0o755 })),
                Some(Node::Dir { .. }) => {}
                Some(other) => {
                    return Err(self.err(format!(
                        "{} is {other:?}, not a directory",
                        parent.display()
                    )))
                }
            }
        }
        match self.nodes.get(rel) {
            None => drop(self.nodes.insert(rel.to_owned(), node)),
            Some(old) if *old == node => {}
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => {}
            Some(old) => {
                return Err(self.err(format!("{}: both {old:?} and {node:?}", rel.display())))
            }
        }
        Ok(())
    }

    /// An empty directory with `mode`, overriding the default 0755.
    fn set_dir(&mut self, rel: &Path, mode: u32) -> Result<(), DriverError> {
        self.insert(rel, Node::Dir { mode })?;
        self.nodes.insert(rel.to_owned(), Node::Dir { mode });
        Ok(())
    }

    fn key(&self, kind: Kind) -> [u8; 32] {
        let mut h = Sha256::new();
        put(&mut h, format!("berth-{}-image", kind.name()).as_bytes());
        h.update(FORMAT_VERSION.to_le_bytes());
        for (path, node) in &self.nodes {
            put(&mut h, path.as_os_str().as_bytes());
            match node {
                Node::Dir { mode } => {
                    h.update(b"d");
                    h.update(mode.to_le_bytes());
                }
                Node::Symlink { target } => {
                    h.update(b"l");
                    put(&mut h, target.as_os_str().as_bytes());
                }
                Node::File { src, mode } => {
                    h.update(b"f");
                    h.update(mode.to_le_bytes());
                    hash_source(&mut h, src);
                }
            }
        }
        h.finalize().into()
    }

    fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for (path, node) in &self.nodes {
            s.nodes += 1;
            let name_len = path.file_name().map_or(0, |n| n.len() as u64);
            s.dirent_bytes += (8 + name_len).div_ceil(4) * 4;
            match node {
                Node::Dir { .. } => s.blocks += 1,
                // ext4 keeps targets shorter than 60 bytes in the inode.
                Node::Symlink { target } => s.blocks += u64::from(target.as_os_str().len() >= 60),
                Node::File { src, .. } => {
                    s.files += 1;
                    s.file_bytes += src.size();
                    s.blocks += src.size().div_ceil(BLOCK);
                }
            }
        }
        s
    }

    /// Writes the tree into `root` (which must not exist).
    fn stage(&self, root: &Path) -> Result<(), DriverError> {
        make_dir(root, 0o755)?;
        for (rel, node) in &self.nodes {
            let dst = root.join(rel);
            match node {
                Node::Dir { mode } => make_dir(&dst, *mode)?,
                Node::Symlink { target } => std::os::unix::fs::symlink(target, &dst)
                    .map_err(DriverError::io("symlink", &dst))?,
                Node::File { src, mode } => self.stage_file(&dst, src, *mode)?,
            }
        }
        Ok(())
    }

    fn stage_file(&self, dst: &Path, src: &Source, mode: u32) -> Result<(), DriverError> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(dst)
            .map_err(DriverError::io("create", dst))?;
        match src {
            Source::Generated(bytes) => out
                .write_all(bytes)
                .map_err(DriverError::io("write", dst))?,
            Source::Host {
                path,
                size,
                mtime,
                ino,
            } => {
                let md = copy_file(path, &mut out, None)?.0;
                if (md.len(), (md.mtime(), md.mtime_nsec()), md.ino()) != (*size, *mtime, *ino) {
                    return Err(self.err(format!(
                        "{} changed while the image was built",
                        path.display()
                    )));
                }
            }
            Source::Hashed { path, size, digest } => {
                let (md, got) = copy_file(path, &mut out, Some(Sha256::new()))?;
                if md.len() != *size || got != Some(*digest) {
                    return Err(self.err(format!(
                        "{} changed while the image was built",
                        path.display()
                    )));
                }
            }
        }
        // The umask may have narrowed the mode at creation.
        out.set_permissions(Permissions::from_mode(mode))
            .map_err(DriverError::io("chmod", dst))
    }
}

fn put(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hash_source(h: &mut Sha256, src: &Source) {
    match src {
        Source::Host {
            path,
            size,
            mtime,
            ino,
        } => {
            h.update(b"h");
            put(h, path.as_os_str().as_bytes());
            h.update(size.to_le_bytes());
            h.update(mtime.0.to_le_bytes());
            h.update(mtime.1.to_le_bytes());
            h.update(ino.to_le_bytes());
        }
        Source::Hashed { size, digest, .. } => {
            h.update(b"c");
            h.update(size.to_le_bytes());
            h.update(digest);
        }
        Source::Generated(bytes) => {
            h.update(b"g");
            put(h, bytes);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn make_dir(path: &Path, mode: u32) -> Result<(), DriverError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(DriverError::io("mkdir", path))?;
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(DriverError::io("chmod", path))
}

/// Copies `src` into `out`, keeping its mtime (a `.pyc` is valid only for its
/// source's mtime), hashing on the way when given a hasher. Returns the
/// source's metadata, taken from the open file.
fn copy_file(
    src: &Path,
    out: &mut File,
    mut hasher: Option<Sha256>,
) -> Result<(fs::Metadata, Option<[u8; 32]>), DriverError> {
    let mut f = File::open(src).map_err(DriverError::io("open", src))?;
    let md = f.metadata().map_err(DriverError::io("stat", src))?;
    match hasher.as_mut() {
        // Without a hasher io::copy can use copy_file_range.
        None => drop(io::copy(&mut f, out).map_err(DriverError::io("copy", src))?),
        Some(h) => {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(DriverError::io("read", src))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(DriverError::io("copy", src))?;
            }
        }
    }
    let mtime = md.modified().map_err(DriverError::io("stat", src))?;
    out.set_modified(mtime)
        .map_err(DriverError::io("utimens", src))?;
    Ok((md, hasher.map(|h| h.finalize().into())))
}

fn digest_file(path: &Path) -> Result<[u8; 32], DriverError> {
    let mut f = File::open(path).map_err(DriverError::io("open", path))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(DriverError::io("read", path))?;
    Ok(h.finalize().into())
}

/// 0755 for directories and for files with any execute bit, 0644 otherwise:
/// world-readable, nothing setuid, nothing writable but by root.
fn normal_mode(md: &fs::Metadata) -> u32 {
    if md.is_dir() || md.mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// `/a/b` as `a/b`.
fn rel(abs: &Path) -> PathBuf {
    abs.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

// ---------------------------------------------------------------------------
// The base image.

/// Stages the base image's tree into `dir` (which must not exist) without
/// building an image: lets tests run the staged Python under `chroot`.
#[doc(hidden)]
pub fn stage_base(guest_binary: &Path, python: &Path, dir: &Path) -> Result<(), DriverError> {
    plan_base(guest_binary, python)?.stage(dir)
}

/// Libraries a manylinux wheel may expect from the system (PEP 600's
/// allow-list, those glibc and GCC ship), copied when the host has them.
const MANYLINUX_LIBS: &[&str] = &[
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libm.so.6",
    "libdl.so.2",
    "librt.so.1",
    "libpthread.so.0",
    "libutil.so.1",
    "libresolv.so.2",
    "libcrypt.so.1",
    "libz.so.1",
];

/// Host programs copied into the base image (with their libraries) when
/// the host has them: `/bin/sh` and the coreutils agents most often call.
pub const BASE_TOOLS: &[&str] = &[
    "/bin/sh",
    "/usr/bin/env",
    "/usr/bin/sleep",
    "/usr/bin/cat",
    "/usr/bin/ls",
    "/usr/bin/true",
];

fn plan_base(guest_binary: &Path, python: &Path) -> Result<Tree, DriverError> {
    let mut t = Tree::new(Kind::Base);
    if !python.is_absolute() {
        return Err(t.err(format!(
            "python {} is not an absolute path",
            python.display()
        )));
    }
    for top in ["/bin", "/lib", "/lib64", "/sbin"] {
        if fs::symlink_metadata(top).is_ok() {
            t.add_chain(Path::new(top))?;
        }
    }
    let python_real = t.add_chain(python)?;
    if !elf_info(&python_real)
        .map_err(DriverError::io("read", &python_real))?
        .elf
    {
        return Err(t.err(format!(
            "{} is not an ELF executable (a shim or a script?); give the interpreter itself",
            python_real.display()
        )));
    }
    let probe = probe_python_cached(&t, python, &python_real)?;
    let mut walked: Vec<PathBuf> = Vec::new();
    for dir in &probe.sys_path {
        if !dir.is_dir() || walked.iter().any(|w| dir.starts_with(w)) {
            continue;
        }
        let real = t.add_chain(dir)?;
        t.add_host_tree(&real, false)?;
        walked.push(dir.clone());
    }
    for p in probe.ssl_paths.iter().map(PathBuf::as_path).chain([
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        Path::new("/etc/localtime"),
    ]) {
        if p.exists() {
            t.add_chain(p)?;
        }
    }
    let guest_dir = match fs::symlink_metadata("/sbin") {
        Ok(_) => rel(&t.add_chain(Path::new("/sbin"))?),
        Err(_) => PathBuf::from("sbin"),
    };
    t.add_guest(guest_binary, &guest_dir.join("berth-guest"))?;
    // A shell and the basic tools agents shell out to, as on the host.
    let mut tools = Vec::new();
    for tool in BASE_TOOLS.iter().map(Path::new) {
        if fs::symlink_metadata(tool).is_ok() {
            tools.push(t.add_chain(tool)?);
        }
    }
    t.add_libraries(&python_real, guest_binary, &tools)?;
    t.add_generated()?;
    Ok(t)
}

#[derive(Debug, Clone)]
struct PythonProbe {
    sys_path: Vec<PathBuf>,
    ssl_paths: Vec<PathBuf>,
}

/// [`probe_python`], remembered for the life of the process while the
/// interpreter binary keeps its identity: starting Python is half the cost of
/// a cache hit.
fn probe_python_cached(t: &Tree, python: &Path, real: &Path) -> Result<PythonProbe, DriverError> {
    type Memo = HashMap<PathBuf, (Identity, PythonProbe)>;
    static PROBED: OnceLock<Mutex<Memo>> = OnceLock::new();
    let memo = PROBED.get_or_init(Default::default);
    let id = identity(real).map_err(|d| t.err(d))?;
    if let Some((seen, probe)) = memo
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(python)
    {
        if *seen == id {
            return Ok(probe.clone());
        }
    }
    let probe = probe_python(t, python)?;
    let mut memo = memo.lock().unwrap_or_else(PoisonError::into_inner);
    if memo.len() >= MAX_LISTED {
        memo.clear();
    }
    memo.insert(python.to_owned(), (id, probe.clone()));
    Ok(probe)
}

fn probe_python(t: &Tree, python: &Path) -> Result<PythonProbe, DriverError> {
    let out = Command::new(python)
        .args(["-I", "-S", "-c", PYTHON_PROBE])
        .env_clear()
        .current_dir("/")
        .output()
        .map_err(|e| t.err(format!("running {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(t.err(format!(
            "{} exited with {}: {}",
            python.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut probe = PythonProbe {
        sys_path: Vec::new(),
        ssl_paths: Vec::new(),
    };
    for line in out.stdout.split(|b| *b == b'\n') {
        let Some(tab) = line.iter().position(|b| *b == b'\t') else {
            continue;
        };
        let value = PathBuf::from(OsStr::from_bytes(&line[tab + 1..]));
        if !value.is_absolute() {
            continue;
        }
        match &line[..tab] {
            b"path" => probe.sys_path.push(value),
            b"ssl" => probe.ssl_paths.push(value),
            _ => {}
        }
    }
    if probe.sys_path.is_empty() {
        return Err(t.err(format!("{} reported no sys.path", python.display())));
    }
    Ok(probe)
}

/// Parts of a Python installation an agent never needs at run time.
fn skip_in_python_tree(name: &OsStr, is_dir: bool, in_pycache: bool) -> bool {
    let name = name.as_bytes();
    if is_dir {
        const DIRS: &[&[u8]] = &[
            b"test",
            b"tests",
            b"idle_test",
            b"idlelib",
            b"tkinter",
            b"turtledemo",
            b"ensurepip",
            b"site-packages",
            b"dist-packages",
        ];
        return DIRS.contains(&name) || name.starts_with(b"config-");
    }
    // Only the unoptimized .pyc is read without -O.
    if in_pycache {
        return name.windows(5).any(|w| w == b".opt-");
    }
    // Test extension modules; _tkinter would pull in X11.
    const PREFIXES: &[&[u8]] = &[
        b"_test",
        b"_ctypes_test",
        b"_tkinter",
        b"xxlimited",
        b"_xxtestfuzz",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

impl Tree {
    /// Adds the host's `path` with every symlink met on the way, so that
    /// `/lib64/ld-linux-x86-64.so.2` brings `lib64 -> usr/lib64`, the link in
    /// `usr/lib64` and the file it points to. Returns the physical path.
    fn add_chain(&mut self, path: &Path) -> Result<PathBuf, DriverError> {
        let mut todo: VecDeque<OsString> = VecDeque::new();
        push_components(&mut todo, path);
        let mut cur = PathBuf::from("/");
        let mut hops = 0;
        while let Some(name) = todo.pop_front() {
            if name == ".." {
                cur.pop();
                continue;
            }
            let next = cur.join(&name);
            let md = fs::symlink_metadata(&next).map_err(DriverError::io("stat", &next))?;
            if md.file_type().is_symlink() {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(self.err(format!("{}: too many symlinks", path.display())));
                }
                let target = fs::read_link(&next).map_err(DriverError::io("readlink", &next))?;
                self.insert(
                    &rel(&next),
                    Node::Symlink {
                        target: target.clone(),
                    },
                )?;
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                let rest: Vec<OsString> = todo.drain(..).collect();
                push_components(&mut todo, &target);
                todo.extend(rest);
            } else {
                if todo.is_empty() {
                    self.add_host_node(&next, &md)?;
                } else {
                    self.insert(&rel(&next), Node::Dir { mode: 0o755 })?;
                }
                cur = next;
            }
        }
        Ok(cur)
    }

    /// A host directory or regular file (not a symlink) at its own path.
    fn add_host_node(&mut self, path: &Path, md: &fs::Metadata) -> Result<(), DriverError> {
        let node = if md.is_dir() {
            Node::Dir { mode: 0o755 }
        } else if md.is_file() {
            Node::File {
                src: Source::Host {
                    path: path.to_owned(),
                    size: md.len(),
                    mtime: (md.mtime(), md.mtime_nsec()),
                    ino: md.ino(),
                },
                mode: normal_mode(md),
            }
        } else {
            return Err(self.err(format!(
                "{}: not a file, directory or symlink",
                path.display()
            )));
        };
        self.insert(&rel(path), node)
    }

    /// Adds the physical directory `dir` and what is under it, less what
    /// [`skip_in_python_tree`] leaves out. Symlinks are kept, and what they
    /// point to outside the tree is added too (Debian's `sitecustomize.py`
    /// links to `/etc/python3.11/`).
    fn add_host_tree(&mut self, dir: &Path, in_pycache: bool) -> Result<(), DriverError> {
        for entry in fs::read_dir(dir).map_err(DriverError::io("read", dir))? {
            let entry = entry.map_err(DriverError::io("read", dir))?;
            let path = entry.path();
            let md = fs::symlink_metadata(&path).map_err(DriverError::io("stat", &path))?;
            if skip_in_python_tree(&entry.file_name(), md.is_dir(), in_pycache) {
                continue;
            }
            if md.file_type().is_symlink() {
                if path.exists() {
                    self.add_chain(&path)?;
                } else {
                    let target =
                        fs::read_link(&path).map_err(DriverError::io("readlink", &path))?;
                    self.insert(&rel(&path), Node::Symlink { target })?;
                }
            } else {
                self.add_host_node(&path, &md)?;
                if md.is_dir() {
                    self.add_host_tree(&path, entry.file_name() == "__pycache__")?;
                }
            }
        }
        Ok(())
    }

    fn add_guest(&mut self, guest_binary: &Path, at: &Path) -> Result<(), DriverError> {
        let md = fs::metadata(guest_binary).map_err(|source| DriverError::GuestBinary {
            path: guest_binary.to_owned(),
            source,
        })?;
        let src = Source::Hashed {
            path: guest_binary.to_owned(),
            size: md.len(),
            digest: digest_file(guest_binary)?,
        };
        self.insert(at, Node::File { src, mode: 0o755 })
    }

    /// Every shared library the interpreter, its extension modules and the
    /// guest load, as the host's dynamic loader resolves them, plus
    /// `libgcc_s.so.1` from libc's directory: glibc `dlopen`s it for
    /// `pthread_exit` and cancellation, which `--list` cannot see.
    fn add_libraries(
        &mut self,
        python: &Path,
        guest: &Path,
        tools: &[PathBuf],
    ) -> Result<(), DriverError> {
        let py = elf_info(python).map_err(DriverError::io("read", python))?;
        let guest_elf = elf_info(guest).map_err(DriverError::io("read", guest))?;
        let interp = py.interp.clone().or(guest_elf.interp.clone());
        let mut objects: Vec<PathBuf> = Vec::new();
        for (path, elf) in [(python, &py), (guest, &guest_elf)] {
            if elf.interp.is_some() {
                objects.push(path.to_owned());
            }
        }
        for tool in tools {
            let elf = elf_info(tool).map_err(DriverError::io("read", tool))?;
            if elf.interp.is_some() {
                objects.push(tool.clone());
            }
        }
        for src in self.nodes.values() {
            if let Node::File {
                src: Source::Host { path, .. },
                ..
            } = src
            {
                let is_so = path
                    .file_name()
                    .is_some_and(|n| n.as_bytes().windows(3).any(|w| w == b".so"));
                if is_so
                    && elf_info(path)
                        .map_err(DriverError::io("read", path))?
                        .dynamic
                {
                    objects.push(path.clone());
                }
            }
        }
        let Some(interp) = interp else {
            if objects.is_empty() {
                return Ok(());
            }
            return Err(self.err("extension modules but no dynamic loader (static python?)"));
        };
        self.add_chain(&interp)?;
        let libs = list_needed(&interp, &objects).map_err(|d| self.err(d))?;
        for lib in &libs {
            self.add_chain(lib)?;
        }
        if let Some(libc) = libs
            .iter()
            .find(|l| l.file_name() == Some(OsStr::new("libc.so.6")))
        {
            let real = fs::canonicalize(libc).map_err(DriverError::io("resolve", libc))?;
            // libgcc_s is loaded by glibc at run time; the rest are the
            // system libraries manylinux wheels may link against (a venv's
            // compiled extensions are not in the closure computed above).
            for name in MANYLINUX_LIBS {
                let lib = real.with_file_name(name);
                if lib.exists() {
                    self.add_chain(&lib)?;
                }
            }
        }
        Ok(())
    }

    fn add_generated(&mut self) -> Result<(), DriverError> {
        for (path, text) in [
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
            ("etc/hosts", HOSTS),
            ("etc/nsswitch.conf", NSSWITCH),
        ] {
            let src = Source::Generated(text.as_bytes().to_vec());
            self.insert(Path::new(path), Node::File { src, mode: 0o644 })?;
        }
        for (dir, mode) in EMPTY_DIRS {
            self.set_dir(Path::new(dir), *mode)?;
        }
        Ok(())
    }
}

fn push_components(todo: &mut VecDeque<OsString>, path: &Path) {
    for c in path.components() {
        match c {
            Component::Normal(n) => todo.push_back(n.to_owned()),
            Component::ParentDir => todo.push_back("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// What matters of an ELF file here.
#[derive(Debug, Default, PartialEq, Eq)]
struct ElfInfo {
    /// A 64-bit little-endian ELF file.
    elf: bool,
    /// Has a dynamic section (a shared library or a dynamic executable).
    dynamic: bool,
    /// The program interpreter (the dynamic loader) of a dynamic executable.
    interp: Option<PathBuf>,
}

/// Reads the program headers of a 64-bit little-endian ELF file; anything
/// else (a static binary aside) gives the default. The dynamic loader's
/// `--list` crashes on static executables, hence the look before running it.
fn elf_info(path: &Path) -> io::Result<ElfInfo> {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    let f = File::open(path)?;
    let mut h = [0u8; 64];
    if f.read_at(&mut h, 0)? < 64 || &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return Ok(ElfInfo::default());
    }
    let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap_or_default());
    let phentsize = u64::from(u16::from_le_bytes([h[54], h[55]]));
    let phnum = u64::from(u16::from_le_bytes([h[56], h[57]]));
    if !(56..=256).contains(&phentsize) {
        return Ok(ElfInfo::default());
    }
    let mut info = ElfInfo {
        elf: true,
        ..ElfInfo::default()
    };
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * phentsize)?;
        let field = |at: usize| u64::from_le_bytes(ph[at..at + 8].try_into().unwrap_or_default());
        match u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) {
            PT_DYNAMIC => info.dynamic = true,
            PT_INTERP => {
                let mut name = vec![0u8; field(32).min(4096) as usize];
                f.read_exact_at(&mut name, field(8))?;
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                name.truncate(end);
                info.interp = Some(PathBuf::from(OsString::from_vec(name)));
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Runs `<interp> --list` on each object (in parallel: one run is ~5 ms and
/// an interpreter has ~50 extension modules) and gathers the libraries.
fn list_needed(interp: &Path, objects: &[PathBuf]) -> Result<BTreeSet<PathBuf>, String> {
    if objects.is_empty() {
        return Ok(BTreeSet::new());
    }
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let chunk = objects.len().div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = objects
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|o| list_one_cached(interp, o))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut libs = BTreeSet::new();
        for h in handles {
            for found in h
                .join()
                .map_err(|_| "dynamic loader worker panicked".to_owned())?
            {
                libs.extend(found?);
            }
        }
        Ok(libs)
    })
}

/// What the base image's key uses for a host file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    size: u64,
    mtime: (i64, i64),
    ino: u64,
}

fn identity(path: &Path) -> Result<Identity, String> {
    let md = fs::metadata(path).map_err(|e| format!("stat {}: {e}", path.display()))?;
    Ok(Identity {
        size: md.len(),
        mtime: (md.mtime(), md.mtime_nsec()),
        ino: md.ino(),
    })
}

/// One `--list` answer, with the identity of the object and of every
/// library it named.
struct Listed {
    object: Identity,
    libs: Vec<(PathBuf, Identity)>,
}

/// Entries kept in a memo (`--list` answers, Python probes) before it
/// starts over.
const MAX_LISTED: usize = 4096;

/// [`list_one`], remembered for the life of the process: an answer is reused
/// while the object and every library it named keep their identity (a
/// library upgrade replaces the file), so a cache hit on a base image spawns
/// no loader.
fn list_one_cached(interp: &Path, object: &Path) -> Result<Vec<PathBuf>, String> {
    static LISTED: OnceLock<Mutex<HashMap<(PathBuf, PathBuf), Listed>>> = OnceLock::new();
    let memo = LISTED.get_or_init(Default::default);
    let key = (interp.to_owned(), object.to_owned());
    let id = identity(object)?;
    {
        let memo = memo.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(hit) = memo.get(&key) {
            let fresh =
                hit.object == id && hit.libs.iter().all(|(p, i)| identity(p).as_ref() == Ok(i));
            if fresh {
                return Ok(hit.libs.iter().map(|(p, _)| p.clone()).collect());
            }
        }
    }
    let libs = list_one(interp, object)?;
    let libs = libs
        .into_iter()
        .map(|p| Ok((p.clone(), identity(&p)?)))
        .collect::<Result<Vec<_>, String>>()?;
    let paths = libs.iter().map(|(p, _)| p.clone()).collect();
    let mut memo = memo.lock().unwrap_or_else(PoisonError::into_inner);
    if memo.len() >= MAX_LISTED {
        memo.clear();
    }
    memo.insert(key, Listed { object: id, libs });
    Ok(paths)
}

fn list_one(interp: &Path, object: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new(interp)
        .arg("--list")
        .arg(object)
        .env_clear()
        .output()
        .map_err(|e| format!("running {} --list: {e}", interp.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --list {} exited with {}: {}",
            interp.display(),
            object.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_list(&String::from_utf8_lossy(&out.stdout)).map_err(|lib| {
        format!(
            "{} needs {lib}, which the host's loader cannot find",
            object.display()
        )
    })
}

/// Parses `ld.so --list` output: `libz.so.1 => /lib/.../libz.so.1 (0x...)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`, `linux-vdso.so.1 (0x...)`. A
/// missing library is the error.
fn parse_list(out: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        let path = match line.split_once(" => ") {
            Some((name, rest)) if rest.starts_with("not found") => return Err(name.to_owned()),
            Some((_, rest)) => rest,
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

// ---------------------------------------------------------------------------
// The version image.

fn plan_version(
    app_dir: &Path,
    venv_dir: Option<&Path>,
    limits: &ImageLimits,
) -> Result<Tree, DriverError> {
    let mut t = Tree::new(Kind::Version);
    let mut budget = Budget {
        bytes: limits.max_version_bytes,
        entries: limits.max_version_entries,
    };
    let roots = [(Some(app_dir), "app"), (venv_dir, "venv")];
    for (dir, top) in roots.into_iter().filter_map(|(d, top)| Some((d?, top))) {
        let md = fs::metadata(dir).map_err(DriverError::io("stat", dir))?;
        if !md.is_dir() {
            return Err(t.err(format!("{} is not a directory", dir.display())));
        }
        t.insert(Path::new(top), Node::Dir { mode: 0o755 })?;
        t.add_version_tree(dir, Path::new(top), &mut budget, limits)?;
    }
    Ok(t)
}

struct Budget {
    bytes: u64,
    entries: u64,
}

impl Tree {
    fn add_version_tree(
        &mut self,
        dir: &Path,
        at: &Path,
        budget: &mut Budget,
        limits: &ImageLimits,
    ) -> Result<(), DriverError> {
        for entry in fs::read_dir(dir).map_err(DriverError::io("read", dir))? {
            let entry = entry.map_err(DriverError::io("read", dir))?;
            let (path, dst) = (entry.path(), at.join(entry.file_name()));
            let md = fs::symlink_metadata(&path).map_err(DriverError::io("stat", &path))?;
            budget.entries = budget.entries.checked_sub(1).ok_or_else(|| {
                self.err(format!(
                    "more than {} entries (limit)",
                    limits.max_version_entries
                ))
            })?;
            let ft = md.file_type();
            if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(DriverError::io("readlink", &path))?;
                self.insert(&dst, Node::Symlink { target })?;
            } else if ft.is_dir() {
                self.insert(&dst, Node::Dir { mode: 0o755 })?;
                self.add_version_tree(&path, &dst, budget, limits)?;
            } else if ft.is_file() {
                budget.bytes = budget.bytes.checked_sub(md.len()).ok_or_else(|| {
                    self.err(format!(
                        "more than {} bytes of files (limit)",
                        limits.max_version_bytes
                    ))
                })?;
                let src = Source::Hashed {
                    path: path.clone(),
                    size: md.len(),
                    digest: digest_file(&path)?,
                };
                self.insert(
                    &dst,
                    Node::File {
                        src,
                        mode: normal_mode(&md),
                    },
                )?;
            } else {
                return Err(self.err(format!(
                    "{} is a device, fifo or socket; a version holds only files, directories and symlinks",
                    path.display()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_loader_list_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f20)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f21)\n";
        assert_eq!(
            parse_list(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert_eq!(
            parse_list("\tlibfoo.so.2 => not found\n"),
            Err("libfoo.so.2".into())
        );
    }

    #[test]
    fn reads_elf_program_headers() {
        let me = elf_info(&std::env::current_exe().unwrap()).unwrap();
        assert!(me.elf && me.dynamic);
        assert!(me.interp.is_some());
        assert_eq!(
            elf_info(Path::new("/etc/hostname")).unwrap_or_default(),
            ElfInfo::default()
        );
    }

    #[test]
    fn chain_keeps_every_link_on_the_way() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("usr/lib/real")).unwrap();
        fs::write(root.join("usr/lib/real/f"), "x").unwrap();
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink(root.join("lib/real/f"), root.join("usr/lib/g")).unwrap();
        let mut t = Tree::new(Kind::Base);
        let real = t.add_chain(&root.join("usr/lib/g")).unwrap();
        assert_eq!(real, root.join("usr/lib/real/f"));
        let r = rel(root);
        assert!(matches!(
            t.nodes[&r.join("usr/lib/g")],
            Node::Symlink { .. }
        ));
        assert!(matches!(t.nodes[&r.join("lib")], Node::Symlink { .. }));
        assert!(matches!(
            t.nodes[&r.join("usr/lib/real/f")],
            Node::File { mode: 0o644, .. }
        ));
    }

    #[test]
    fn insert_refuses_conflicts_and_accepts_repeats() {
        let mut t = Tree::new(Kind::Version);
        let link = Node::Symlink { target: "x".into() };
        t.insert(Path::new("a/b"), link.clone()).unwrap();
        t.insert(Path::new("a/b"), link).unwrap();
        assert!(t
            .insert(Path::new("a/b/c"), Node::Dir { mode: 0o755 })
            .is_err());
        assert!(matches!(t.nodes[Path::new("a")], Node::Dir { mode: 0o755 }));
    }

    #[test]
    fn base_key_follows_the_guest_bytes() {
        let d = tempfile::tempdir().unwrap();
        let exe = fs::read(std::env::current_exe().unwrap()).unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::write(&a, &exe).unwrap();
        fs::write(&b, [exe.as_slice(), b"x"].concat()).unwrap();
        let key = |g: &Path| {
            plan_base(g, Path::new("/usr/bin/python3"))
                .unwrap()
                .key(Kind::Base)
        };
        assert_eq!(key(&a), key(&a));
        assert_ne!(key(&a), key(&b));
    }

    #[test]
    fn refuses_a_python_that_is_a_script() {
        let d = tempfile::tempdir().unwrap();
        let shim = d.path().join("python3");
        fs::write(&shim, "#!/bin/sh\nexec /usr/bin/python3 \"$@\"\n").unwrap();
        fs::set_permissions(&shim, Permissions::from_mode(0o755)).unwrap();
        let err = plan_base(&std::env::current_exe().unwrap(), &shim).unwrap_err();
        assert!(err.to_string().contains("not an ELF"), "{err}");
    }

    #[test]
    fn geometry_leaves_room() {
        let s = Stats {
            files: 10,
            file_bytes: 10 * MIB,
            blocks: 10 * MIB / BLOCK,
            dirent_bytes: 400,
            nodes: 12,
        };
        let (bytes, inodes) = s.geometry();
        assert!(bytes >= 11 * MIB + 16 * MIB && bytes % MIB == 0);
        assert!(inodes > 12);
    }

    #[test]
    fn image_names_are_recognized() {
        assert_eq!(
            Kind::of_file_name(OsStr::new("base-00ff.ext4")),
            Some(Kind::Base)
        );
        assert_eq!(
            Kind::of_file_name(OsStr::new("version-00ff.ext4")),
            Some(Kind::Version)
        );
        assert_eq!(Kind::of_file_name(OsStr::new(".build-1-0-base.tmp")), None);
        assert_eq!(Kind::of_file_name(OsStr::new("baseline.ext4")), None);
    }
}
