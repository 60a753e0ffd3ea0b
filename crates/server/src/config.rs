//! Server configuration: one typed struct, loaded from an optional TOML
//! file; flags are applied on top by the CLI.

use berth_core::manifest::{Isolation, IsolationPolicy};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(&'static str),
}

/// berth's settings. Each field's doc gives its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP API (default 127.0.0.1:7070).
    pub listen: SocketAddr,
    /// Where the store, agents and sandbox state live (default ./berth-data).
    pub data_dir: PathBuf,
    /// Create a dev tenant, user and key and deploy the example agents
    /// (default false).
    pub dev: bool,
    /// Where `--dev` finds the example agents (default: `examples/agents`
    /// under the working directory, then beside the executable's checkout).
    pub examples_dir: Option<PathBuf>,
    /// Smallest idle timeout or max lifetime an agent may ask for, in seconds
    /// (default 60; lower it only for tests and development).
    pub min_lifetime_s: u64,
    /// Largest request body, in bytes (default 100 MB).
    pub max_body_bytes: u64,
    /// Largest request head (request line and headers), in bytes
    /// (default 16 KiB; a larger head gets 431).
    pub max_header_bytes: usize,
    /// Time a client has to send its request head, in seconds (default 10).
    pub header_timeout_s: u64,
    /// Open client connections (default 10000).
    pub max_connections: usize,
    /// Python used to build agents' environments (default /usr/bin/python3).
    pub python: PathBuf,
    /// `AWS_REGION` in sandboxes (default us-east-1).
    pub aws_region: String,
    /// Queued invocations per session beyond the running one (default 16).
    pub queue_depth: usize,
    /// Live sessions on this node (default 1000).
    pub max_live_sessions: usize,
    /// `/ping` polling interval in milliseconds (default 2000).
    pub ping_interval_ms: u64,
    /// Grace between the stop signal and the hard kill, in seconds (default 15).
    pub stop_grace_s: u64,
    /// First host uid used for sandboxes (default 200000).
    pub sandbox_uid_base: u32,
    /// Number of host uids for sandboxes, i.e. concurrent sandboxes (default 10000).
    pub sandbox_uid_count: u32,
    /// Size of each sandbox's private /tmp, in MiB (default 256).
    pub sandbox_tmp_mb: u64,
    /// Name of berth's cgroup in each v1 controller; start-up sweeps every
    /// sandbox cgroup under it (default "berth").
    pub sandbox_cgroup: String,
    /// Per-tenant and per-user quotas.
    pub quotas: Quotas,
    /// Accept bearer JWTs of this OIDC issuer (default: none).
    pub oidc: Option<crate::auth::oidc::OidcConfig>,
    /// Lifetime of the workload token an agent gets on each request, in
    /// seconds (default 900; 1 to 86400).
    pub workload_token_ttl_s: u64,
    /// Age at which the workload signing key is replaced, in seconds; the
    /// previous key still verifies. At least `workload_token_ttl_s`
    /// (default 604800, a week).
    pub workload_key_rotation_s: u64,
    /// The `[isolation]` section: the substrate of agents whose `berth.toml`
    /// names none (`default`, default "process") and, per tenant, the
    /// weakest substrate its sessions may run on (`require`, default none).
    pub isolation: IsolationPolicy,
    /// Substrates this server tries to start (default all three). One the
    /// host cannot run is reported by `berth doctor`, and agents asking
    /// for it are refused with `substrate_unavailable`.
    pub substrates: Vec<Isolation>,
    /// The `[gvisor]` section.
    pub gvisor: GvisorSection,
    /// The `[microvm]` section.
    pub microvm: MicrovmSection,
}

/// The `[gvisor]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GvisorSection {
    /// The runsc binary (default "runsc", looked up on PATH).
    pub runsc: PathBuf,
    /// runsc platforms tried in order at start-up; the first that runs a
    /// probe container is used (default ["ptrace"]).
    pub platforms: Vec<String>,
}

impl Default for GvisorSection {
    fn default() -> Self {
        Self {
            runsc: PathBuf::from("runsc"),
            platforms: vec!["ptrace".into()],
        }
    }
}

/// The `[microvm]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MicrovmSection {
    /// The guest kernel, an uncompressed vmlinux (default
    /// /var/lib/berth/kernel/vmlinux, where `scripts/build-kernel` puts it).
    pub kernel: PathBuf,
    /// The QEMU binary (default "qemu-system-x86_64", looked up on PATH).
    pub qemu: PathBuf,
    /// "auto" (KVM when a probe boot works, else software emulation with
    /// a warning), "kvm" or "tcg" (default "auto").
    pub accel: String,
    /// First host uid of QEMU processes (default 240000).
    pub uid_base: u32,
    /// Number of uids, i.e. concurrent microVMs (default 10000).
    pub uid_count: u32,
}

impl Default for MicrovmSection {
    fn default() -> Self {
        Self {
            kernel: PathBuf::from("/var/lib/berth/kernel/vmlinux"),
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: "auto".into(),
            uid_base: 240_000,
            uid_count: 10_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("berth-data"),
            dev: false,
            examples_dir: None,
            min_lifetime_s: 60,
            max_body_bytes: 100 * 1000 * 1000,
            max_header_bytes: 16 * 1024,
            header_timeout_s: 10,
            max_connections: 10_000,
            python: PathBuf::from("/usr/bin/python3"),
            aws_region: "us-east-1".into(),
            queue_depth: 16,
            max_live_sessions: 1000,
            ping_interval_ms: 2000,
            stop_grace_s: 15,
            sandbox_uid_base: 200_000,
            sandbox_uid_count: 10_000,
            sandbox_tmp_mb: 256,
            sandbox_cgroup: "berth".into(),
            oidc: None,
            workload_token_ttl_s: 900,
            workload_key_rotation_s: 7 * 86_400,
            quotas: Quotas::default(),
            isolation: IsolationPolicy::default(),
            substrates: Isolation::ALL.to_vec(),
            gvisor: GvisorSection::default(),
            microvm: MicrovmSection::default(),
        }
    }
}

/// The `[quotas]` section; 0 means unlimited. Over a session count a
/// request gets 402, over a rate 429, and no sandbox is started.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Live sessions per tenant (default 1000).
    pub tenant_sessions: u32,
    /// Live sessions per user (default 1000).
    pub user_sessions: u32,
    /// New sessions per minute per tenant (default 6000).
    pub tenant_creations_per_minute: u32,
    /// New sessions per minute per user (default 6000).
    pub user_creations_per_minute: u32,
    /// Invocations per second per tenant (default 50000).
    pub tenant_invocations_per_second: u32,
    /// Invocations per second per user (default 20000).
    pub user_invocations_per_second: u32,
    /// Whether idle sessions hold a slot in the session counts (default true).
    pub idle_sessions_count: bool,
}

impl Default for Quotas {
    fn default() -> Self {
        let d = berth_session::QuotaConfig::default();
        let n = |v: Option<u32>| v.unwrap_or(0);
        Self {
            tenant_sessions: n(d.tenant_sessions),
            user_sessions: n(d.user_sessions),
            tenant_creations_per_minute: n(d.tenant_creations_per_minute),
            user_creations_per_minute: n(d.user_creations_per_minute),
            tenant_invocations_per_second: n(d.tenant_invocations_per_second),
            user_invocations_per_second: n(d.user_invocations_per_second),
            idle_sessions_count: d.idle_sessions_count,
        }
    }
}

impl Quotas {
    pub fn to_session(&self) -> berth_session::QuotaConfig {
        let some = |v: u32| (v > 0).then_some(v);
        berth_session::QuotaConfig {
            tenant_sessions: some(self.tenant_sessions),
            user_sessions: some(self.user_sessions),
            tenant_creations_per_minute: some(self.tenant_creations_per_minute),
            user_creations_per_minute: some(self.user_creations_per_minute),
            tenant_invocations_per_second: some(self.tenant_invocations_per_second),
            user_invocations_per_second: some(self.user_invocations_per_second),
            idle_sessions_count: self.idle_sessions_count,
        }
    }
}

impl Config {
    /// Defaults, overlaid with `file` when given.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = file else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::Invalid(
                "max_header_bytes must be at least 8192",
            ));
        }
        if self.queue_depth == 0 || self.max_live_sessions == 0 {
            return Err(ConfigError::Invalid(
                "queue_depth and max_live_sessions must be positive",
            ));
        }
        if !self.substrates.contains(&self.isolation.default) {
            return Err(ConfigError::Invalid(
                "isolation.default must be one of the enabled substrates",
            ));
        }
        if !["auto", "kvm", "tcg"].contains(&self.microvm.accel.as_str()) {
            return Err(ConfigError::Invalid(
                "microvm.accel must be \"auto\", \"kvm\" or \"tcg\"",
            ));
        }
        if self.ping_interval_ms < 10 {
            return Err(ConfigError::Invalid("ping_interval_ms must be at least 10"));
        }
        if !(1..=86_400).contains(&self.workload_token_ttl_s) {
            return Err(ConfigError::Invalid(
                "workload_token_ttl_s must be between 1 and 86400",
            ));
        }
        if self.workload_key_rotation_s < self.workload_token_ttl_s {
            return Err(ConfigError::Invalid(
                "workload_key_rotation_s must be at least workload_token_ttl_s",
            ));
        }
        Ok(())
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("berth.db")
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_s.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<Config, _> = toml::from_str("listn = \"127.0.0.1:1\"");
        assert!(r.unwrap_err().to_string().contains("listn"));
        let c: Config = toml::from_str("min_lifetime_s = 1").unwrap();
        assert_eq!(c.min_lifetime_s, 1);
        assert_eq!(c.listen.port(), 7070);
    }
}
