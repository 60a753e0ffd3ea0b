//! Resource and lifecycle limits of an agent, with their defaults.

use serde::{Deserialize, Serialize};

/// What one sandbox may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// CPU share in vCPUs (default 1.0, at most 2.0).
    pub vcpus: f64,
    /// Memory limit in MiB (default 512, at most 8192).
    pub memory_mb: u64,
    /// Maximum number of processes and threads (default 256).
    pub pids: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            vcpus: 1.0,
            memory_mb: 512,
            pids: 256,
        }
    }
}

/// When a session's sandbox is reaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lifecycle {
    /// Seconds without a request or background work before the sandbox is
    /// terminated (default 900).
    pub idle_timeout_s: u64,
    /// Seconds from sandbox start until it is terminated, never reset
    /// (default 28800).
    pub max_lifetime_s: u64,
    /// Seconds the agent has to answer `/ping` healthy after start (default 120).
    pub start_timeout_s: u64,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            idle_timeout_s: 900,
            max_lifetime_s: 28_800,
            start_timeout_s: 120,
        }
    }
}

/// The largest lifetime berth accepts: 30 days.
pub const MAX_LIFETIME_LIMIT_S: u64 = 30 * 24 * 3600;
