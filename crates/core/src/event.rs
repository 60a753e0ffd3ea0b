//! What the session log records.

use crate::ids::{AgentName, RequestId, SessionId, TenantId, UserId};
use crate::status::SessionStatus;
use serde::{Deserialize, Serialize};

/// Why an activation ended. Every termination records one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TerminationReason {
    /// No request and no background work for the agent's idle timeout.
    IdleTimeout,
    /// The activation reached the agent's maximum lifetime.
    MaxLifetime,
    /// A caller stopped the session.
    Stopped,
    /// The agent did not become healthy within its start timeout, or the
    /// sandbox could not be started.
    StartFailed,
    /// `/ping` failed or hung repeatedly.
    Unhealthy,
    /// The agent or its sandbox exited on its own.
    Exited,
    /// berth shut down gracefully.
    Shutdown,
    /// berth found the activation live in its log after a crash.
    Recovered,
}

impl TerminationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IdleTimeout => "idle_timeout",
            Self::MaxLifetime => "max_lifetime",
            Self::Stopped => "stopped",
            Self::StartFailed => "start_failed",
            Self::Unhealthy => "unhealthy",
            Self::Exited => "exited",
            Self::Shutdown => "shutdown",
            Self::Recovered => "recovered",
        }
    }
}

/// Resource use of one activation, read from its sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSample {
    pub active_seconds: f64,
    pub idle_seconds: f64,
    pub cpu_seconds: f64,
    pub peak_memory_bytes: u64,
}

/// One thing that happened to a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionEvent {
    /// The session id was seen for the first time; the owner is fixed here.
    Created {
        agent: AgentName,
        tenant: TenantId,
        user: UserId,
    },
    /// A sandbox was started for a new activation.
    SandboxStarted {
        agent_version: u64,
        substrate: String,
        epoch: u64,
        sandbox_ms: f64,
        agent_ms: f64,
    },
    InvocationReceived {
        request_id: RequestId,
        bytes_in: u64,
    },
    InvocationCompleted {
        request_id: RequestId,
        status: u16,
        bytes_out: u64,
        duration_ms: f64,
    },
    StatusChanged {
        from: SessionStatus,
        to: SessionStatus,
    },
    Terminated {
        reason: TerminationReason,
        detail: Option<String>,
    },
    /// Usage of the activation, recorded when it ends.
    Usage(UsageSample),
}

impl SessionEvent {
    /// The `type` tag, as stored and as filtered on.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Created { .. } => "created",
            Self::SandboxStarted { .. } => "sandbox_started",
            Self::InvocationReceived { .. } => "invocation_received",
            Self::InvocationCompleted { .. } => "invocation_completed",
            Self::StatusChanged { .. } => "status_changed",
            Self::Terminated { .. } => "terminated",
            Self::Usage(_) => "usage",
        }
    }
}

/// An event as stored: numbered per session from 1, without gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub session_id: SessionId,
    pub seq: u64,
    pub epoch: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub event: SessionEvent,
}
