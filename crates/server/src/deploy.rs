//! Deploying agent versions.
//!
//! The CLI packs an agent directory into a `.tar.gz` ([`pack_dir`]); the
//! server unpacks it, checks its `berth.toml`, installs its Python
//! dependencies into a virtual environment and moves the result to
//! `agents_dir/<name>/<version>` ([`install`]). Recording the version in the
//! catalog is the caller's job.
//!
//! The archive is untrusted input. It is unpacked into a fresh staging
//! directory that holds no links at all, so no later path can resolve
//! outside it; sizes and counts are measured while unpacking, never taken
//! from headers; and a failed install leaves nothing behind.

use berth_core::manifest::{Manifest, ManifestError, ManifestPolicy};
use flate2::{read::GzDecoder, write::GzEncoder, Compression};
use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use uuid::Uuid;
use walkdir::WalkDir;

/// The manifest's file name, at the top of the agent directory.
pub const MANIFEST_FILE: &str = "berth.toml";
/// Python dependencies, installed into a venv when present.
pub const REQUIREMENTS_FILE: &str = "requirements.txt";
/// Where the sandbox mounts a version's venv. Scripts in the venv's `bin`
/// are rewritten to run from there.
pub const VENV_MOUNT: &str = "/venv";
/// Default for [`DeployConfig::max_archive_bytes`] and the limit of
/// [`pack_dir`]: 100 MiB.
pub const DEFAULT_MAX_ARCHIVE_BYTES: u64 = 100 << 20;
/// Directories never packed: local environments, caches and history.
const SKIPPED_DIRS: &[&str] = &[".venv", "__pycache__", ".git"];
const MAX_MANIFEST_BYTES: u64 = 64 << 10;
const MAX_REQUIREMENTS_BYTES: u64 = 1 << 20;
/// Lines of a failed command's output kept for the error.
const TAIL_LINES: usize = 40;
/// Longer output lines are cut, so a command cannot make berth buffer
/// without bound.
const MAX_LINE_BYTES: usize = 4096;
/// Environment passed to `python -m venv` and pip; everything else of the
/// server's environment (credentials above all) is withheld, because pip
/// expands `${VAR}` and could send it to an index.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_CERT",
    "PIP_CACHE_DIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
];

/// Why a deploy failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("the upload is not a valid .tar.gz archive: {0}")]
    Archive(#[source] io::Error),
    #[error("the archive has the unsafe path {path:?}: only relative paths inside the agent directory are allowed")]
    UnsafePath { path: String },
    #[error(
        "the archive entry {path:?} is a {kind}: only regular files and directories are allowed"
    )]
    UnsafeEntry { path: String, kind: &'static str },
    #[error("the archive is larger than the limit of {limit} bytes")]
    ArchiveTooLarge { limit: u64 },
    #[error("the agent's files add up to more than the limit of {limit} bytes")]
    UnpackedTooLarge { limit: u64 },
    #[error("the archive has more than the limit of {limit} files and directories")]
    TooManyFiles { limit: u64 },
    #[error("there is no berth.toml at the top of the agent directory")]
    MissingManifest,
    #[error("berth.toml {reason}")]
    ManifestUnreadable { reason: &'static str },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("requirements.txt {reason}")]
    RequirementsUnreadable { reason: &'static str },
    #[error("requirements.txt line {line}: {reason}")]
    UnsafeRequirement { line: usize, reason: &'static str },
    #[error("creating the python environment failed ({status}): {tail}")]
    Venv { status: ExitStatus, tail: String },
    #[error("installing requirements.txt failed ({status}):\n{tail}")]
    Pip { status: ExitStatus, tail: String },
    #[error("{step} took longer than {timeout:?}:\n{tail}")]
    Timeout {
        step: &'static str,
        timeout: Duration,
        tail: String,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl DeployError {
    /// A stable snake_case code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            DeployError::Archive(_) => "invalid_archive",
            DeployError::UnsafePath { .. } | DeployError::UnsafeEntry { .. } => "unsafe_archive",
            DeployError::ArchiveTooLarge { .. } | DeployError::UnpackedTooLarge { .. } => {
                "archive_too_large"
            }
            DeployError::TooManyFiles { .. } => "archive_too_many_files",
            DeployError::MissingManifest => "missing_manifest",
            DeployError::ManifestUnreadable { .. } | DeployError::Manifest(_) => "invalid_manifest",
            DeployError::RequirementsUnreadable { .. } | DeployError::UnsafeRequirement { .. } => {
                "invalid_requirements"
            }
            DeployError::Pip { .. } | DeployError::Timeout { .. } => "dependency_install_failed",
            DeployError::Venv { .. } => "environment_failed",
            DeployError::Io { .. } => "internal",
        }
    }

    /// Whether the deployer can fix this by changing the agent (a 4xx),
    /// rather than a fault of the server (a 5xx).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, DeployError::Venv { .. } | DeployError::Io { .. })
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DeployError {
    let path = path.to_owned();
    move |source| DeployError::Io { op, path, source }
}

/// Where and how versions are installed.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// Root of installed versions: `<agents_dir>/<name>/<version>`.
    pub agents_dir: PathBuf,
    /// Interpreter that creates venvs (default `/usr/bin/python3`, which the
    /// sandbox mounts at the same path).
    pub python: PathBuf,
    /// Largest upload, compressed (default 100 MiB).
    pub max_archive_bytes: u64,
    /// Largest total size of the unpacked files (default 256 MiB).
    pub max_unpacked_bytes: u64,
    /// Most files and directories in an archive (default 10,000).
    pub max_files: u64,
    /// Time allowed for creating the venv, and again for pip (default 10 min).
    pub pip_timeout: Duration,
    /// Bounds on manifests.
    pub policy: ManifestPolicy,
    /// Whether pip may build packages from source (default false). Building
    /// runs the package's own code on the host with berth's privileges, so
    /// by default only wheels are installed.
    pub allow_source_builds: bool,
}

impl DeployConfig {
    pub fn new(agents_dir: impl Into<PathBuf>) -> Self {
        Self {
            agents_dir: agents_dir.into(),
            python: PathBuf::from("/usr/bin/python3"),
            max_archive_bytes: DEFAULT_MAX_ARCHIVE_BYTES,
            max_unpacked_bytes: 256 << 20,
            max_files: 10_000,
            pip_timeout: Duration::from_secs(600),
            policy: ManifestPolicy::default(),
            allow_source_builds: false,
        }
    }
}

/// An installed version.
#[derive(Debug, Clone)]
pub struct Installed {
    pub manifest: Manifest,
    /// The version's id, the last component of `dir`.
    pub version: Uuid,
    /// `agents_dir/<name>/<version>`.
    pub dir: PathBuf,
    /// `dir/app`: the agent's files, the entrypoint's cwd.
    pub app_dir: PathBuf,
    /// `dir/venv`, when the agent has a `requirements.txt`.
    pub venv_dir: Option<PathBuf>,
}

/// Packs an agent directory as a `.tar.gz`, refusing more than 100 MiB.
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>, DeployError> {
    pack_dir_limited(dir, DEFAULT_MAX_ARCHIVE_BYTES)
}

/// Packs an agent directory: regular files and directories only (links and
/// special files are left out), without `.venv`, `__pycache__` and `.git`.
/// `max_bytes` bounds both the files' total size and the archive.
pub fn pack_dir_limited(dir: &Path, max_bytes: u64) -> Result<Vec<u8>, DeployError> {
    if !dir.join(MANIFEST_FILE).is_file() {
        return Err(DeployError::MissingManifest);
    }
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let walker = WalkDir::new(dir)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            !(e.file_type().is_dir()
                && e.file_name()
                    .to_str()
                    .is_some_and(|n| SKIPPED_DIRS.contains(&n)))
        });
    let mut total = 0u64;
    for entry in walker {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_owned();
            io_err("reading", &path)(e.into())
        })?;
        let path = entry.path();
        let rel = path.strip_prefix(dir).unwrap_or(path);
        let ft = entry.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            tar.append_data(&mut header, rel, io::empty())
                .map_err(io_err("packing", path))?;
        } else if ft.is_file() {
            let meta = entry
                .metadata()
                .map_err(|e| io_err("reading", path)(e.into()))?;
            total += meta.len();
            if total > max_bytes {
                return Err(DeployError::ArchiveTooLarge { limit: max_bytes });
            }
            let exec = meta.permissions().mode() & 0o111 != 0;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if exec { 0o755 } else { 0o644 });
            header.set_size(meta.len());
            let file = std::fs::File::open(path).map_err(io_err("reading", path))?;
            tar.append_data(&mut header, rel, file.take(meta.len()))
                .map_err(io_err("packing", path))?;
        }
    }
    let gz = tar.into_inner().map_err(io_err("packing", dir))?;
    let bytes = gz.finish().map_err(io_err("packing", dir))?;
    if bytes.len() as u64 > max_bytes {
        return Err(DeployError::ArchiveTooLarge { limit: max_bytes });
    }
    Ok(bytes)
}

/// Removes a staging directory when dropped, unless disarmed: a failed or
/// cancelled install leaves nothing behind.
struct Staging {
    path: PathBuf,
    armed: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.armed {
            // Blocking, but rare (only on failure) and bounded by the
            // archive's file limit.
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "removing staging directory");
            }
        }
    }
}

/// Unpacks, checks and installs an uploaded agent archive. Progress lines
/// for the deployer go to `progress`; a closed receiver does not stop the
/// install.
pub async fn install(
    cfg: &DeployConfig,
    archive: &[u8],
    progress: mpsc::Sender<String>,
) -> Result<Installed, DeployError> {
    if archive.len() as u64 > cfg.max_archive_bytes {
        return Err(DeployError::ArchiveTooLarge {
            limit: cfg.max_archive_bytes,
        });
    }
    let version = Uuid::new_v4();
    let staging_path = cfg.agents_dir.join(format!(".staging-{version}"));
    tokio::fs::create_dir_all(&cfg.agents_dir)
        .await
        .map_err(io_err("creating", &cfg.agents_dir))?;
    // Private until published: nobody should run a half-installed version.
    tokio::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging_path)
        .await
        .map_err(io_err("creating", &staging_path))?;
    let mut staging = Staging {
        path: staging_path.clone(),
        armed: true,
    };

    say(&progress, format!("unpacking {} bytes…", archive.len())).await;
    let app = staging_path.join("app");
    let (files, bytes) = blocking(&staging_path, {
        let (archive, app, cfg) = (archive.to_vec(), app.clone(), cfg.clone());
        move || unpack(&archive, &app, &cfg)
    })
    .await?;
    say(
        &progress,
        format!("unpacked {files} entries, {bytes} bytes"),
    )
    .await;
    let manifest = read_manifest(&app, &cfg.policy).await?;
    let venv = install_requirements(cfg, &staging_path, &progress).await?;

    blocking(&staging_path, {
        let root = staging_path.clone();
        move || normalize_permissions(&root)
    })
    .await?;
    let parent = cfg.agents_dir.join(manifest.name.as_str());
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(io_err("creating", &parent))?;
    let dir = parent.join(version.to_string());
    tokio::fs::rename(&staging_path, &dir)
        .await
        .map_err(io_err("moving", &staging_path))?;
    staging.armed = false;
    say(
        &progress,
        format!("installed {} version {version}", manifest.name),
    )
    .await;
    Ok(Installed {
        manifest,
        version,
        app_dir: dir.join("app"),
        venv_dir: venv.then(|| dir.join("venv")),
        dir,
    })
}

async fn say(progress: &mpsc::Sender<String>, line: String) {
    let _ = progress.send(line).await;
}

/// Runs file work off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, DeployError> + Send + 'static,
) -> Result<T, DeployError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err("installing", path)(io::Error::other(e)))?
}

/// Creates `staging/venv` and installs `staging/app/requirements.txt` into
/// it, when the agent has one. Returns whether it did.
async fn install_requirements(
    cfg: &DeployConfig,
    staging: &Path,
    progress: &mpsc::Sender<String>,
) -> Result<bool, DeployError> {
    let app = staging.join("app");
    let path = app.join(REQUIREMENTS_FILE);
    if !tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()) {
        return Ok(false);
    }
    let requirements = read_limited(
        &path,
        MAX_REQUIREMENTS_BYTES,
        DeployError::RequirementsUnreadable {
            reason: "is larger than 1 MiB",
        },
        DeployError::RequirementsUnreadable {
            reason: "is not UTF-8",
        },
    )
    .await?;
    check_requirements(&requirements)?;
    let venv = staging.join("venv");
    create_venv(cfg, &venv, progress).await?;
    let count = pip_install(cfg, &venv, &app, progress).await?;
    say(progress, format!("installed {count} packages")).await;
    relocate_scripts(&venv, VENV_MOUNT).await?;
    Ok(true)
}

/// Deletes a version's files. A version that is already gone is fine;
/// other failures are logged, since nothing the caller could do differs.
pub async fn remove(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %dir.display(), error = %e, "removing agent version"),
    }
}

/// Removes staging directories left by installs that were interrupted
/// (a crash or restart); call at startup. Returns how many were removed.
pub async fn sweep_staging(agents_dir: &Path) -> usize {
    let Ok(mut entries) = tokio::fs::read_dir(agents_dir).await else {
        return 0;
    };
    let mut removed = 0;
    while let Ok(Some(entry)) = entries.next_entry().await {
        if entry.file_name().to_string_lossy().starts_with(".staging-") {
            remove(&entry.path()).await;
            removed += 1;
        }
    }
    removed
}

/// Counts the bytes that come out of the decompressor, so that what tar
/// buffers itself (long names, pax headers) is bounded too, not only the
/// file contents.
struct Counted<'a, R> {
    inner: R,
    left: u64,
    exceeded: &'a Cell<bool>,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            self.exceeded.set(true);
            return Err(io::Error::other("archive too large"));
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// A path inside the destination, or an error: only plain names, no
/// root, no `..`.
fn safe_relative(path: &Path) -> Result<PathBuf, DeployError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(DeployError::UnsafePath {
                    path: path.to_string_lossy().into_owned(),
                })
            }
        }
    }
    Ok(out)
}

fn entry_kind(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Symlink => "symbolic link",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "fifo",
        tar::EntryType::GNUSparse => "sparse file",
        _ => "special entry",
    }
}

/// Unpacks into `dest`, which must not exist yet. Returns the number of
/// entries and of content bytes.
fn unpack(archive: &[u8], dest: &Path, cfg: &DeployConfig) -> Result<(u64, u64), DeployError> {
    std::fs::create_dir(dest).map_err(io_err("creating", dest))?;
    let exceeded = Cell::new(false);
    // Headers take 512 bytes per entry, plus slack for long names.
    let overhead = cfg.max_files.saturating_mul(2048).saturating_add(1 << 20);
    let reader = Counted {
        inner: GzDecoder::new(archive),
        left: cfg.max_unpacked_bytes.saturating_add(overhead),
        exceeded: &exceeded,
    };
    let too_large = DeployError::UnpackedTooLarge {
        limit: cfg.max_unpacked_bytes,
    };
    let archive_err = |e: io::Error| {
        if exceeded.get() {
            DeployError::UnpackedTooLarge {
                limit: cfg.max_unpacked_bytes,
            }
        } else {
            DeployError::Archive(e)
        }
    };
    let mut tar = tar::Archive::new(reader);
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in tar.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let raw = entry.path().map_err(archive_err)?.into_owned();
        let rel = safe_relative(&raw)?;
        files += 1;
        if files > cfg.max_files {
            return Err(DeployError::TooManyFiles {
                limit: cfg.max_files,
            });
        }
        let target = dest.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(fs_err("creating", &target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if rel.as_os_str().is_empty() {
                    return Err(DeployError::UnsafePath {
                        path: raw.to_string_lossy().into_owned(),
                    });
                }
                let exec = entry.header().mode().is_ok_and(|m| m & 0o111 != 0);
                let left = cfg.max_unpacked_bytes - bytes;
                let n = write_file(&target, &mut (&mut entry).take(left + 1), exec).map_err(
                    |e| match e {
                        DeployError::Archive(e) => archive_err(e),
                        e => e,
                    },
                )?;
                bytes += n;
                if bytes > cfg.max_unpacked_bytes {
                    return Err(too_large);
                }
            }
            other => {
                return Err(DeployError::UnsafeEntry {
                    path: raw.to_string_lossy().into_owned(),
                    kind: entry_kind(other),
                })
            }
        }
    }
    Ok((files, bytes))
}

/// Writes one unpacked file; returns its length.
fn write_file(target: &Path, data: &mut impl Read, exec: bool) -> Result<u64, DeployError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(fs_err("creating", parent))?;
    }
    let mut file = std::fs::File::create(target).map_err(fs_err("creating", target))?;
    // Not io::copy: a read error is the archive's fault, a write error ours.
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = match data.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DeployError::Archive(e)),
        };
        file.write_all(&buf[..k])
            .map_err(io_err("writing", target))?;
        n += k as u64;
    }
    file.flush().map_err(io_err("writing", target))?;
    let mode = if exec { 0o755 } else { 0o644 };
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("setting permissions", target))?;
    Ok(n)
}

/// Like [`io_err`], but blames the archive when its own layout is the
/// cause (a file where a directory should be, or the reverse).
fn fs_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DeployError {
    let io = io_err(op, path);
    move |e| match e.kind() {
        io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory
        | io::ErrorKind::AlreadyExists => DeployError::Archive(e),
        _ => io(e),
    }
}

/// Makes a version readable, not writable, by the sandbox's user: dirs
/// 0755, files 0644 (0755 when executable). Links (the venv's python) are
/// left alone.
fn normalize_permissions(root: &Path) -> Result<(), DeployError> {
    for entry in WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(|e| io_err("reading", root)(e.into()))?;
        let ft = entry.file_type();
        let mode = if ft.is_dir() {
            0o755
        } else if ft.is_file() {
            let m = entry
                .metadata()
                .map_err(|e| io_err("reading", entry.path())(e.into()))?;
            if m.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            }
        } else {
            continue;
        };
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(mode))
            .map_err(io_err("setting permissions", entry.path()))?;
    }
    Ok(())
}

async fn read_limited(
    path: &Path,
    limit: u64,
    too_large: DeployError,
    not_utf8: DeployError,
) -> Result<String, DeployError> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(io_err("reading", path))?;
    if meta.len() > limit {
        return Err(too_large);
    }
    let bytes = tokio::fs::read(path)
        .await
        .map_err(io_err("reading", path))?;
    String::from_utf8(bytes).map_err(|_| not_utf8)
}

async fn read_manifest(app: &Path, policy: &ManifestPolicy) -> Result<Manifest, DeployError> {
    let path = app.join(MANIFEST_FILE);
    match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => {}
        _ => return Err(DeployError::MissingManifest),
    }
    let text = read_limited(
        &path,
        MAX_MANIFEST_BYTES,
        DeployError::ManifestUnreadable {
            reason: "is larger than 64 KiB",
        },
        DeployError::ManifestUnreadable {
            reason: "is not UTF-8",
        },
    )
    .await?;
    let manifest = Manifest::parse_toml(&text)?;
    manifest.validate(policy)?;
    Ok(manifest)
}

/// Refuses requirement lines that would make pip read the host's files or
/// environment: options (`-r /etc/shadow`, `--find-links /root`), local
/// paths, `${VAR}` references and line continuations (which could join an
/// option together). Package names, versions, markers, `--hash` and URLs
/// are fine.
fn check_requirements(text: &str) -> Result<(), DeployError> {
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let bad = |reason| DeployError::UnsafeRequirement {
            line: i + 1,
            reason,
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.ends_with('\\') {
            return Err(bad("line continuations are not allowed"));
        }
        if line.starts_with('-') {
            return Err(bad("pip options are not allowed, only requirements"));
        }
        if line.contains("${") {
            return Err(bad("environment variable references are not allowed"));
        }
        let path_like = line.starts_with('.')
            || line.starts_with('/')
            || line.starts_with('~')
            || line.to_ascii_lowercase().contains("file:")
            || (line.contains('/') && !line.contains("://"));
        if path_like {
            return Err(bad("local paths are not allowed"));
        }
    }
    Ok(())
}

fn command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in PASSED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd
}

enum Outcome {
    Exited(ExitStatus),
    TimedOut,
}

/// Reads one line of at most `MAX_LINE_BYTES` (the rest of a longer line is
/// dropped). `None` at the end.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned()));
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let newline = done > chunk.len();
        r.consume(done);
        if newline {
            let s = String::from_utf8_lossy(&line);
            return Ok(Some(s.trim_end_matches('\r').to_owned()));
        }
    }
}

/// Runs a command, sending each line of its output to `progress` and
/// keeping the last lines in `tail`.
async fn run_logged(
    mut cmd: Command,
    timeout: Duration,
    progress: &mpsc::Sender<String>,
    tail: &mut VecDeque<String>,
) -> io::Result<Outcome> {
    let mut child = cmd.spawn()?;
    let (tx, mut rx) = mpsc::channel::<String>(64);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(BufReader::new(out), tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(BufReader::new(err), tx.clone()));
    }
    drop(tx);
    let run = async {
        while let Some(line) = rx.recv().await {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.clone());
            let _ = progress.send(line).await;
        }
        child.wait().await
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(status) => Ok(Outcome::Exited(status?)),
        Err(_) => {
            let _ = child.kill().await;
            Ok(Outcome::TimedOut)
        }
    }
}

async fn forward_lines<R: AsyncBufRead + Unpin>(mut r: R, tx: mpsc::Sender<String>) {
    while let Ok(Some(line)) = read_line(&mut r).await {
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

fn join_tail(tail: VecDeque<String>) -> String {
    Vec::from(tail).join("\n")
}

async fn create_venv(
    cfg: &DeployConfig,
    venv: &Path,
    progress: &mpsc::Sender<String>,
) -> Result<(), DeployError> {
    let _ = progress.send("creating python environment…".into()).await;
    let mut cmd = command(&cfg.python);
    cmd.arg("-m").arg("venv").arg(venv);
    let mut tail = VecDeque::new();
    let outcome = run_logged(cmd, cfg.pip_timeout, progress, &mut tail)
        .await
        .map_err(io_err("running", &cfg.python))?;
    match outcome {
        Outcome::Exited(status) if status.success() => Ok(()),
        Outcome::Exited(status) => Err(DeployError::Venv {
            status,
            tail: join_tail(tail),
        }),
        Outcome::TimedOut => Err(DeployError::Timeout {
            step: "creating the python environment",
            timeout: cfg.pip_timeout,
            tail: join_tail(tail),
        }),
    }
}

/// Installs `requirements.txt` from `app` into `venv`; returns how many
/// packages pip installed.
async fn pip_install(
    cfg: &DeployConfig,
    venv: &Path,
    app: &Path,
    progress: &mpsc::Sender<String>,
) -> Result<usize, DeployError> {
    let _ = progress.send("installing requirements.txt…".into()).await;
    let python = venv.join("bin/python");
    let mut cmd = command(&python);
    cmd.current_dir(app).args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--root-user-action",
        "ignore",
    ]);
    if !cfg.allow_source_builds {
        cmd.arg("--only-binary=:all:");
    }
    cmd.args(["-r", REQUIREMENTS_FILE]);
    let mut tail = VecDeque::new();
    let outcome = run_logged(cmd, cfg.pip_timeout, progress, &mut tail)
        .await
        .map_err(io_err("running", &python))?;
    match outcome {
        Outcome::Exited(status) if status.success() => Ok(tail
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("Successfully installed "))
            .map_or(0, |rest| rest.split_whitespace().count())),
        Outcome::Exited(status) => Err(DeployError::Pip {
            status,
            tail: join_tail(tail),
        }),
        Outcome::TimedOut => Err(DeployError::Timeout {
            step: "installing requirements.txt",
            timeout: cfg.pip_timeout,
            tail: join_tail(tail),
        }),
    }
}

/// The scripts pip writes into `venv/bin` name the interpreter by the path
/// the venv was created at, which is the staging directory. Rewrite them
/// to where the sandbox mounts the venv. The interpreter itself is a link
/// to `/usr/bin/python3` and finds the venv through `pyvenv.cfg` next to
/// it, so it needs no change.
async fn relocate_scripts(venv: &Path, mount: &str) -> Result<(), DeployError> {
    let bin = venv.join("bin");
    let from = venv.as_os_str().as_encoded_bytes().to_vec();
    let mut entries = tokio::fs::read_dir(&bin)
        .await
        .map_err(io_err("reading", &bin))?;
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(io_err("reading", &bin))?
    {
        let path = entry.path();
        let ft = entry.file_type().await.map_err(io_err("reading", &path))?;
        if !ft.is_file() {
            continue;
        }
        let data = tokio::fs::read(&path)
            .await
            .map_err(io_err("reading", &path))?;
        if data.len() > (1 << 20) || !contains(&data, &from) {
            continue;
        }
        let rewritten = replace_all(&data, &from, mount.as_bytes());
        tokio::fs::write(&path, rewritten)
            .await
            .map_err(io_err("writing", &path))?;
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn replace_all(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn echo_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agents/echo")
    }

    /// A deploy config rooted in a fresh temp dir; `agents_dir` is
    /// `<root>/agents`, so anything written beside it is visible.
    fn setup() -> (tempfile::TempDir, DeployConfig) {
        let root = tempfile::tempdir().expect("tempdir");
        let cfg = DeployConfig::new(root.path().join("agents"));
        (root, cfg)
    }

    async fn run(
        cfg: &DeployConfig,
        archive: &[u8],
    ) -> (Result<Installed, DeployError>, Vec<String>) {
        let (tx, mut rx) = mpsc::channel(1024);
        let result = install(cfg, archive, tx).await;
        let mut lines = Vec::new();
        while let Ok(l) = rx.try_recv() {
            lines.push(l);
        }
        (result, lines)
    }

    /// Names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn assert_no_staging(cfg: &DeployConfig) {
        let left: Vec<String> = names(&cfg.agents_dir)
            .into_iter()
            .filter(|n| n.starts_with(".staging-"))
            .collect();
        assert!(left.is_empty(), "staging left behind: {left:?}");
    }

    /// A tar.gz built from raw headers, so that it can hold what the tar
    /// crate's safe API refuses to write.
    /// Path, type, link name, contents.
    type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

    fn raw_archive(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        let manifest = b"name = \"evil\"\nentrypoint = [\"python3\", \"main.py\"]\n";
        let mut h = tar::Header::new_gnu();
        h.set_path("berth.toml").expect("path");
        h.set_size(manifest.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &manifest[..]).expect("append");
        for (path, kind, link, data) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..path.len()].copy_from_slice(path);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    fn archive_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, path, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    const MANIFEST: &[u8] = b"name = \"t\"\nentrypoint = [\"python3\", \"main.py\"]\n";

    #[tokio::test]
    async fn echo_round_trip() {
        let (_root, cfg) = setup();
        let archive = pack_dir(&echo_dir()).expect("pack");
        let (result, lines) = run(&cfg, &archive).await;
        let inst = result.expect("install");
        assert_eq!(inst.manifest.name.as_str(), "echo");
        assert_eq!(inst.manifest.entrypoint, vec!["python3", "main.py"]);
        assert_eq!(
            inst.dir,
            cfg.agents_dir.join("echo").join(inst.version.to_string())
        );
        assert_eq!(inst.app_dir, inst.dir.join("app"));
        assert!(inst.venv_dir.is_none());
        assert_eq!(names(&inst.app_dir), vec!["berth.toml", "main.py"]);
        let original = std::fs::read(echo_dir().join("main.py")).expect("read");
        assert_eq!(
            std::fs::read(inst.app_dir.join("main.py")).expect("read"),
            original
        );
        for p in [&inst.dir, &inst.app_dir] {
            let mode = std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o755, "{}", p.display());
        }
        let mode = std::fs::metadata(inst.app_dir.join("main.py"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(
            lines.iter().any(|l| l.starts_with("unpacking")),
            "{lines:?}"
        );
        assert_no_staging(&cfg);
        remove(&inst.dir).await;
        assert!(!inst.dir.exists());
        remove(&inst.dir).await; // already gone is fine
    }

    #[test]
    fn pack_skips_caches_links_and_needs_a_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        assert!(matches!(pack_dir(d), Err(DeployError::MissingManifest)));
        std::fs::write(d.join("berth.toml"), MANIFEST).expect("write");
        for skipped in [".venv", "__pycache__", ".git", "pkg/__pycache__"] {
            std::fs::create_dir_all(d.join(skipped)).expect("mkdir");
            std::fs::write(d.join(skipped).join("x"), b"x").expect("write");
        }
        std::fs::write(d.join("pkg/mod.py"), b"pass").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).expect("symlink");
        let bytes = pack_dir(d).expect("pack");
        let mut ar = tar::Archive::new(GzDecoder::new(&bytes[..]));
        let mut paths: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        paths.sort();
        assert_eq!(paths, vec!["berth.toml", "pkg", "pkg/mod.py"]);
        std::fs::write(d.join("big"), vec![0u8; 2000]).expect("write");
        assert!(matches!(
            pack_dir_limited(d, 1000),
            Err(DeployError::ArchiveTooLarge { limit: 1000 })
        ));
    }

    #[tokio::test]
    async fn unsafe_archives_are_rejected_and_write_nothing_outside() {
        let (root, cfg) = setup();
        let outside = format!("/tmp/berth-deploy-test-{}", Uuid::new_v4());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                raw_archive(&[(b"../x", tar::EntryType::Regular, b"", b"pwned")]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[(b"../../../x", tar::EntryType::Regular, b"", b"pwned")]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[(b"a/../../x", tar::EntryType::Regular, b"", b"pwned")]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[(outside.as_bytes(), tar::EntryType::Regular, b"", b"pwned")]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[
                    (b"passwd", tar::EntryType::Symlink, b"/etc/passwd", b""),
                    (b"passwd", tar::EntryType::Regular, b"", b"pwned"),
                ]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[
                    (b"up", tar::EntryType::Symlink, b"../../..", b""),
                    (b"up/x", tar::EntryType::Regular, b"", b"pwned"),
                ]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[(b"hard", tar::EntryType::Link, b"../../x", b"")]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[(b"hard", tar::EntryType::Link, b"berth.toml", b"")]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[(b"dev", tar::EntryType::Char, b"", b"")]),
                "unsafe_archive",
            ),
            (
                raw_archive(&[(b"fifo", tar::EntryType::Fifo, b"", b"")]),
                "unsafe_archive",
            ),
            (b"not a gzip stream".to_vec(), "invalid_archive"),
            (
                raw_archive(&[
                    (b"a", tar::EntryType::Regular, b"", b"x"),
                    (b"a/b", tar::EntryType::Regular, b"", b"y"),
                ]),
                "invalid_archive",
            ),
            (
                {
                    let whole = archive_of(&[("berth.toml", MANIFEST), ("f", &[1u8; 5000])]);
                    whole[..whole.len() / 2].to_vec()
                },
                "invalid_archive",
            ),
        ];
        for (i, (archive, code)) in cases.iter().enumerate() {
            let (result, _) = run(&cfg, archive).await;
            let err = result.expect_err("must be refused");
            assert_eq!(err.code(), *code, "case {i}: {err}");
            assert!(err.is_user_error());
        }
        assert_eq!(names(root.path()), vec!["agents"]);
        assert!(
            names(&cfg.agents_dir).is_empty(),
            "{:?}",
            names(&cfg.agents_dir)
        );
        assert!(!Path::new(&outside).exists());
    }

    #[tokio::test]
    async fn limits_are_enforced_while_unpacking() {
        let (_root, mut cfg) = setup();
        cfg.max_unpacked_bytes = 1000;
        let big = vec![7u8; 1001];
        let (r, _) = run(
            &cfg,
            &archive_of(&[("berth.toml", MANIFEST), ("big", &big)]),
        )
        .await;
        assert!(
            matches!(r, Err(DeployError::UnpackedTooLarge { limit: 1000 })),
            "{r:?}"
        );
        // A long name tar would buffer whole is bounded too.
        cfg.max_files = 2;
        let (r, _) = run(
            &cfg,
            &archive_of(&[("berth.toml", MANIFEST), ("a", b""), ("b", b"")]),
        )
        .await;
        assert!(
            matches!(r, Err(DeployError::TooManyFiles { limit: 2 })),
            "{r:?}"
        );
        cfg.max_archive_bytes = 10;
        let (r, _) = run(&cfg, &archive_of(&[("berth.toml", MANIFEST)])).await;
        let err = r.expect_err("must be refused");
        assert_eq!(err.code(), "archive_too_large");
        assert_no_staging(&cfg);
        assert!(names(&cfg.agents_dir).is_empty());
    }

    #[tokio::test]
    async fn manifest_problems() {
        let (_root, cfg) = setup();
        let (r, _) = run(&cfg, &archive_of(&[("main.py", b"")])).await;
        let err = r.expect_err("must be refused");
        assert_eq!(err.code(), "missing_manifest");
        let bad = b"name = \"t\"\nentrypoint = [\"python3\"]\ncolour = \"blue\"\n";
        let (r, _) = run(&cfg, &archive_of(&[("berth.toml", bad)])).await;
        let err = r.expect_err("must be refused");
        assert_eq!(err.code(), "invalid_manifest");
        assert!(err.to_string().contains("colour"), "{err}");
        let bad = b"name = \"t\"\nentrypoint = [\"python3\"]\n[lifecycle]\nidle_timeout_s = 5\n";
        let (r, _) = run(&cfg, &archive_of(&[("berth.toml", bad)])).await;
        let err = r.expect_err("must be refused");
        assert!(matches!(
            err,
            DeployError::Manifest(ManifestError::OutOfRange { .. })
        ));
        let (r, _) = run(&cfg, &archive_of(&[("berth.toml", b"\xff\xfe")])).await;
        assert_eq!(r.expect_err("must be refused").code(), "invalid_manifest");
        assert!(names(&cfg.agents_dir).is_empty());
    }

    #[test]
    fn requirement_lines() {
        for ok in [
            "six==1.16.0",
            "# comment\n\nrequests>=2 ; python_version >= \"3.8\"",
            "foo[extra]~=1.0 --hash=sha256:abc",
            "pkg @ https://example.invalid/pkg-1.0-py3-none-any.whl",
        ] {
            check_requirements(ok).expect(ok);
        }
        for bad in [
            "-r /etc/shadow",
            "--index-url http://127.0.0.1/",
            "-e .",
            "./local",
            "/abs/path.whl",
            "sub/dir",
            "pkg @ file:///etc",
            "pkg==${HOME}",
            "six \\",
            "~/x",
        ] {
            let e = check_requirements(bad).expect_err(bad);
            assert_eq!(e.code(), "invalid_requirements", "{bad}");
        }
        let e = check_requirements("six\n-r x").expect_err("line 2");
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[tokio::test]
    async fn requirements_are_installed_into_a_relocatable_venv() {
        let (_root, cfg) = setup();
        let archive = archive_of(&[
            ("berth.toml", MANIFEST),
            ("main.py", b"import six\n"),
            ("requirements.txt", b"six==1.16.0\n"),
        ]);
        let (result, lines) = run(&cfg, &archive).await;
        let inst = result.unwrap_or_else(|e| panic!("install (needs PyPI): {e}\n{lines:#?}"));
        let venv = inst.venv_dir.clone().expect("venv");
        assert_eq!(venv, inst.dir.join("venv"));
        assert!(
            lines.iter().any(|l| l == "creating python environment…"),
            "{lines:#?}"
        );
        assert!(lines.iter().any(|l| l.contains("six-1.16.0")), "{lines:#?}");
        assert!(
            lines.iter().any(|l| l == "installed 1 packages"),
            "{lines:#?}"
        );
        let out = std::process::Command::new(venv.join("bin/python"))
            .args(["-c", "import six, sys; print(six.__version__, sys.prefix)"])
            .output()
            .expect("run venv python");
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("1.16.0 "), "{stdout}");
        let cfg_text = std::fs::read_to_string(venv.join("pyvenv.cfg")).expect("pyvenv.cfg");
        assert!(cfg_text.contains("home = /usr/bin"), "{cfg_text}");
        let pip = std::fs::read_to_string(venv.join("bin/pip")).expect("pip script");
        assert!(pip.starts_with("#!/venv/bin/python"), "{pip}");
        assert!(!pip.contains(".staging-"), "{pip}");
        assert_no_staging(&cfg);
    }

    #[tokio::test]
    async fn failed_requirements_leave_nothing_behind() {
        let (_root, cfg) = setup();
        let archive = archive_of(&[
            ("berth.toml", MANIFEST),
            ("requirements.txt", b"berth-no-such-package-7f3a9c1e==1.0\n"),
        ]);
        let (result, lines) = run(&cfg, &archive).await;
        match result {
            Err(DeployError::Pip { status, tail }) => {
                assert!(!status.success());
                assert!(
                    tail.contains("berth-no-such-package-7f3a9c1e"),
                    "tail should say which requirement failed: {tail}"
                );
            }
            other => panic!("expected a pip error, got {other:?}\n{lines:#?}"),
        }
        assert!(
            names(&cfg.agents_dir).is_empty(),
            "{:?}",
            names(&cfg.agents_dir)
        );
    }

    #[tokio::test]
    async fn sweep_removes_interrupted_installs() {
        let (_root, cfg) = setup();
        std::fs::create_dir_all(cfg.agents_dir.join(".staging-old/app")).expect("mkdir");
        std::fs::create_dir_all(cfg.agents_dir.join("echo")).expect("mkdir");
        assert_eq!(sweep_staging(&cfg.agents_dir).await, 1);
        assert_eq!(names(&cfg.agents_dir), vec!["echo"]);
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let data = format!("{}\nshort\r\nlast", "x".repeat(MAX_LINE_BYTES * 3));
        let mut r = BufReader::with_capacity(100, data.as_bytes());
        let first = read_line(&mut r).await.expect("read").expect("line");
        assert_eq!(first.len(), MAX_LINE_BYTES);
        assert_eq!(
            read_line(&mut r).await.expect("read").as_deref(),
            Some("short")
        );
        assert_eq!(
            read_line(&mut r).await.expect("read").as_deref(),
            Some("last")
        );
        assert_eq!(read_line(&mut r).await.expect("read"), None);
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(DeployError::MissingManifest.code(), "missing_manifest");
        assert_eq!(
            DeployError::UnsafePath {
                path: "../x".into()
            }
            .code(),
            "unsafe_archive"
        );
        assert_eq!(
            DeployError::ArchiveTooLarge { limit: 1 }.code(),
            "archive_too_large"
        );
        assert_eq!(
            DeployError::Manifest(ManifestError::EmptyEntrypoint).code(),
            "invalid_manifest"
        );
    }
}
