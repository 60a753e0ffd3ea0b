use berth_log::LogError;
use berth_sandbox::DriverError;

/// Why a session command failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The session does not exist, or belongs to someone else: the two are
    /// deliberately indistinguishable.
    #[error("session not found")]
    NotFound,
    /// The session id is bound to a different agent.
    #[error("session belongs to agent {0}")]
    AgentMismatch(String),
    /// The session's invocation queue is full.
    #[error("too many requests queued for this session (limit {0})")]
    QueueFull(usize),
    /// This node already holds its maximum of live sessions.
    #[error("too many live sessions on this node (limit {0})")]
    TooManySessions(usize),
    /// The sandbox or the agent did not start.
    #[error("agent failed to start: {0}")]
    StartFailed(String),
    /// The agent could not be reached or failed at the transport level.
    #[error("agent unreachable: {0}")]
    AgentUnreachable(String),
    /// The session was terminated while the request waited or ran.
    #[error("session was terminated ({0}) before the request completed")]
    Terminated(&'static str),
    /// A quota of the caller's tenant or user refused the request.
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaError),
    /// The tenant's policy requires a stronger substrate than the agent's.
    #[error(
        "this tenant's sessions must run on {required} or stronger; the agent runs on {wanted}"
    )]
    IsolationPolicy {
        wanted: &'static str,
        required: &'static str,
    },
    /// The agent's substrate cannot run on this host.
    #[error("{0}")]
    SubstrateUnavailable(DriverError),
    /// berth is shutting down.
    #[error("berth is shutting down")]
    ShuttingDown,
    #[error("session log: {0}")]
    Log(#[from] LogError),
    #[error("sandbox: {0}")]
    Driver(#[from] DriverError),
}
