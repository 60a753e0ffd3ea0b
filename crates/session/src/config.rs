use berth_core::{AgentName, SessionId, TenantId, UserId};
use std::sync::Arc;
use std::time::Duration;

/// Mints the short-lived token an activation's agent receives in the
/// `WorkloadAccessToken` header on every request (never in its environment
/// or files).
pub trait WorkloadTokens: Send + Sync + 'static {
    /// A token naming (tenant, user, agent, session, epoch), or `None` when
    /// tokens are off.
    fn mint(
        &self,
        tenant: &TenantId,
        user: &UserId,
        agent: &AgentName,
        session: &SessionId,
        epoch: u64,
    ) -> Option<String>;
}

/// Limits and timings of the session layer. Each field's doc gives its default.
#[derive(Clone)]
pub struct SessionConfig {
    /// Queued invocations per session beyond the running one (default 16).
    pub queue_depth: usize,
    /// Live sessions on this node (default 1000).
    pub max_live_sessions: usize,
    /// How often `/ping` is polled (default 2 s).
    pub ping_interval: Duration,
    /// How long one `/ping` may take (default 5 s).
    pub ping_timeout: Duration,
    /// Consecutive failed pings before the sandbox is terminated (default 3).
    pub ping_failures: u32,
    /// Time between a graceful stop signal and the hard kill (default 15 s).
    pub stop_grace: Duration,
    /// The value of `AWS_REGION` in every sandbox (default "us-east-1").
    pub aws_region: String,
    /// Per-tenant and per-user quotas.
    pub quotas: crate::quota::QuotaConfig,
    /// Workload tokens for agents (default: none).
    pub tokens: Option<Arc<dyn WorkloadTokens>>,
    /// Default substrate and per-tenant minimums (default: process, none).
    pub isolation: berth_core::manifest::IsolationPolicy,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            queue_depth: 16,
            max_live_sessions: 1000,
            ping_interval: Duration::from_secs(2),
            ping_timeout: Duration::from_secs(5),
            ping_failures: 3,
            stop_grace: Duration::from_secs(15),
            aws_region: "us-east-1".to_owned(),
            tokens: None,
            quotas: crate::quota::QuotaConfig::default(),
            isolation: berth_core::manifest::IsolationPolicy::default(),
        }
    }
}
