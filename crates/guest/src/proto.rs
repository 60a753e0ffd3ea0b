//! What the host and the guest say to each other. The host writes a
//! [`GuestSpec`] as JSON into the sandbox's state directory; the guest answers
//! on the channel with one line (`ok` or `err <json>`) and then speaks HTTP/2.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The file descriptor on which the guest finds its end of the channel.
pub const CHANNEL_FD: i32 = 3;
/// The guest's status endpoint (GET).
pub const STATUS_PATH: &str = "/_berth/status";
/// The guest's shutdown endpoint (POST, `?grace_ms=N`).
pub const SHUTDOWN_PATH: &str = "/_berth/shutdown";
/// Paths under this prefix belong to the guest and are never relayed.
pub const RESERVED_PREFIX: &str = "/_berth/";
/// First line the guest writes on the channel once setup succeeded.
pub const READY_LINE: &str = "ok";
/// Prefix of the line the guest writes when setup failed.
pub const FAILED_PREFIX: &str = "err ";
/// Longest preamble line the host accepts.
pub const MAX_PREAMBLE: usize = 4096;

/// Everything the guest needs to build the sandbox and start the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    pub sandbox_id: String,
    /// Empty directory that becomes the sandbox's `/`.
    pub root_dir: PathBuf,
    /// Overlay upper and work directories for `/app`.
    pub upper_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Read-only lower layer of `/app`.
    pub app_dir: PathBuf,
    pub venv_dir: Option<PathBuf>,
    pub entrypoint: Vec<String>,
    pub env: Vec<(String, String)>,
    pub agent_port: u16,
    pub uid: u32,
    pub gid: u32,
    /// `cgroup.procs` files the guest writes its pid into before unsharing.
    pub cgroup_procs: Vec<PathBuf>,
    pub tmp_size_mb: u64,
    /// Host paths bind-mounted read-only at the same place inside.
    pub readonly_host_paths: Vec<PathBuf>,
    /// RLIMIT_NOFILE for the agent.
    pub nofile: u64,
    /// RLIMIT_NPROC for the session uid (the uid is private to the sandbox).
    pub nproc: u64,
}

/// Why setup failed: the stage and the errno of the failing call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SetupFailure {
    pub stage: String,
    pub errno: i32,
}

/// The agent as the guest sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct GuestStatus {
    /// Agent pid inside the sandbox's pid namespace.
    pub agent_pid: Option<i32>,
    pub running: bool,
    /// Exit code when the agent exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the agent was killed by a signal.
    pub signal: Option<i32>,
    pub shutting_down: bool,
}

/// Name of the virtio-serial port that carries a microVM's channel.
pub const VM_PORT_NAME: &str = "berth.0";
/// Prefix of the guest's answer to a [`VmHello`]: `ready <nonce>`.
pub const VM_READY_PREFIX: &str = "ready ";
/// Console line the guest prints when the agent ended: `berth-guest: exit <code>`.
pub const VM_EXIT_PREFIX: &str = "berth-guest: exit ";
/// Console line the guest prints when the host hung up and it waits for
/// the next hello (a template is snapshotted only in this state).
pub const VM_PARKED_LINE: &str = "berth-guest: parked";
/// Longest hello line the guest reads.
pub const VM_MAX_HELLO: usize = 64 * 1024;

/// What the host of a microVM writes as one JSON line on the channel each
/// time it connects, before any HTTP/2: after a snapshot restore the guest
/// learns from it that it is a new sandbox. The guest applies it (entropy,
/// clock, identity) before it answers `ready <nonce>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmHello {
    /// Echoed in the ready line, so the host can tell it from leftovers.
    pub nonce: u64,
    /// The session this VM now serves.
    pub session_id: String,
    /// Fresh host randomness (at least 32 bytes), mixed into the kernel
    /// RNG with full entropy credit, followed by a forced reseed.
    pub seed: Vec<u8>,
    /// Host wall clock (CLOCK_REALTIME) when the hello was written.
    pub time_secs: i64,
    pub time_nanos: u32,
    /// The agent to start; only the first hello of a boot carries it.
    pub agent: Option<VmAgentSpec>,
    /// Template boot: the guest answers only once the agent's `/ping`
    /// answered 200 (waiting at most this many ms), speaks no HTTP/2 on
    /// this connection and waits for the next hello. A snapshot taken then
    /// has nothing in flight on the port.
    #[serde(default)]
    pub park_after_ping_ms: Option<u64>,
}

/// The agent a microVM guest starts on its first hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmAgentSpec {
    pub entrypoint: Vec<String>,
    pub env: Vec<(String, String)>,
    pub agent_port: u16,
    /// Unprivileged uid and gid the agent runs as inside the VM.
    pub uid: u32,
    pub gid: u32,
    /// RLIMIT_NOFILE for the agent.
    pub nofile: u64,
    /// RLIMIT_NPROC for the agent's uid.
    pub nproc: u64,
}
