use std::path::PathBuf;

use berth_guest::proto::SetupFailure;

/// Everything a driver can fail with, one variant per cause.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid sandbox id {0:?}: want [a-z0-9-]{{1,64}}")]
    InvalidId(String),
    #[error("invalid sandbox spec: {field} {reason}")]
    InvalidSpec {
        field: &'static str,
        reason: &'static str,
    },
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    #[error("no free uid slot: {0} sandboxes live")]
    NoUidSlot(usize),
    #[error("guest binary {path} not usable: {source}")]
    GuestBinary {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spawning the guest failed: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("sandbox setup failed at stage {stage}: errno {errno} ({})", nix::errno::Errno::from_raw(*errno))]
    Setup { stage: String, errno: i32 },
    #[error("guest did not report ready within {0:?}")]
    SetupTimeout(std::time::Duration),
    #[error("guest sent a malformed preamble")]
    BadPreamble,
    #[error("guest exited before it answered")]
    GuestGone,
    #[error("guest channel: {0}")]
    Channel(#[source] hyper::Error),
    #[error("guest answered {status} on {path}")]
    GuestStatusCode { path: &'static str, status: u16 },
    #[error("guest sent an invalid body on {path}")]
    GuestBody { path: &'static str },
    #[error("path {0} is reserved for the guest")]
    ReservedPath(String),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("processes still alive in cgroup {0} after kill")]
    KillTimeout(PathBuf),
    #[error("unmount {path}: {errno}")]
    Unmount {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("substrate {substrate} cannot run on this host: {reason}")]
    Unavailable {
        substrate: &'static str,
        reason: String,
    },
    #[error("building image {image}: {detail}")]
    Image { image: String, detail: String },
    #[error("virtual machine monitor: {0}")]
    Vmm(String),
    #[error("the guest did not answer its first request")]
    FirstAnswer,
    #[error("runsc: {0}")]
    Runsc(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<SetupFailure> for DriverError {
    fn from(f: SetupFailure) -> Self {
        DriverError::Setup {
            stage: f.stage,
            errno: f.errno,
        }
    }
}

impl DriverError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| DriverError::Io { op, path, source }
    }
}
