//! The durable session log and the small catalog (agents, versions, API keys).
//!
//! # Design
//!
//! Every state change of a session is an event in this log before berth
//! acknowledges it, so an `append` returns only once its event is on disk.
//! The SQLite backend ([`SqliteLog`]) gets there with three rules:
//!
//! - **One writer.** A single thread owns the only write connection. Every
//!   write (session appends, activations, catalog changes) is a command sent to
//!   it over one channel with a oneshot reply. Because the epoch check and the
//!   next sequence number are computed on that thread, inside the transaction
//!   that writes the event, two writers can never race for a seq or slip past
//!   an epoch check.
//! - **Group commit.** The writer takes everything waiting in its channel (up
//!   to a cap) and runs it in one transaction, so one fsync pays for many
//!   sessions' appends. Replies are sent, and subscribers woken, only after
//!   the commit returns; a reply of `Ok` therefore always means durable.
//! - **Stop on a failed commit.** If a batch fails in the database (a failed
//!   write, commit or fsync), every request in it gets an error and the writer
//!   stops: later requests get [`LogError::Closed`]. After a failed fsync the
//!   state of the file is unknown, and berth must not acknowledge anything
//!   more on top of it.
//!
//! Epochs keep a session single-instance: each [`SessionLog::activate`] bumps
//! the session's epoch, and the log refuses appends that carry any other epoch
//! ([`LogError::StaleEpoch`]), so an activation that lost its place (a crashed
//! node, a replaced actor) cannot write into the new one's history.
//!
//! Ownership is fixed by the first activation and read back from the log on
//! every later one; a session owned by someone else is reported exactly like a
//! missing one ([`LogError::NotFound`]).
//!
//! Reads use their own connections on the blocking thread pool, so they never
//! wait for the writer (WAL mode) and never block the async runtime.

#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod audit;
mod catalog;
mod sqlite;

pub use audit::{
    bound as bound_audit_field, AuditDraft, AuditFilter, AuditOutcome, AuditRecord,
    MAX_AUDIT_FIELD_BYTES,
};
pub use catalog::{AgentRecord, ApiKeyRecord, VersionRecord};
pub use sqlite::{SqliteConfig, SqliteLog};

use berth_core::{
    AgentName, EventRecord, Principal, SessionEvent, SessionId, SessionStatus, TenantId,
    TerminationReason, UsageSample, UserId,
};

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The session does not exist, or it belongs to someone else. The two are
    /// deliberately indistinguishable.
    #[error("session not found")]
    NotFound,
    /// An append from an activation that is not the session's current one.
    #[error("stale epoch {got}, the session's current epoch is {current}")]
    StaleEpoch { current: u64, got: u64 },
    /// The writer has stopped (after a failed write or commit, or at
    /// shutdown); nothing more is acknowledged.
    #[error("the session log is closed")]
    Closed,
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored data that does not parse, or an event that would not parse back
    /// once stored (and so is refused).
    #[error("corrupt log data: {0}")]
    Corrupt(String),
    /// The write conflicts with what is stored, e.g. a duplicate API key.
    #[error("conflict: {0}")]
    Conflict(&'static str),
}

/// The outcome of [`SessionLog::activate`].
#[derive(Debug, Clone)]
pub struct Activation {
    /// The epoch the new activation must append with.
    pub epoch: u64,
    /// Whether this call created the session.
    pub created: bool,
    /// The session as stored after the activation.
    pub record: SessionRecord,
}

/// A session's current state, kept up to date by every append.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionRecord {
    pub id: SessionId,
    pub agent: AgentName,
    pub tenant: TenantId,
    pub user: UserId,
    pub status: SessionStatus,
    pub epoch: u64,
    pub activations: u64,
    pub agent_version: Option<u64>,
    pub substrate: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub last_seq: u64,
    /// Why the latest activation ended; cleared when a new one starts.
    pub termination_reason: Option<TerminationReason>,
    /// Summed over all activations (peak memory is the maximum).
    pub usage: UsageSample,
    pub invocations: u64,
}

/// Which sessions [`SessionLog::list_sessions`] returns. Unset fields match
/// everything.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub tenant: Option<TenantId>,
    pub user: Option<UserId>,
    pub agent: Option<AgentName>,
    pub status: Option<SessionStatus>,
    /// At most this many (0 means [`DEFAULT_LIST_LIMIT`]; capped at
    /// [`MAX_LIST_LIMIT`]).
    pub limit: usize,
}

/// How usage rows are grouped. Every grouping is within a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageGroup {
    Session,
    Agent,
    User,
    Tenant,
}

/// Which sessions [`SessionLog::usage`] counts. Unset fields match everything.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub tenant: Option<TenantId>,
    pub user: Option<UserId>,
    pub agent: Option<AgentName>,
    pub session: Option<SessionId>,
}

/// Usage summed over the sessions of one group.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UsageRow {
    /// The session id, agent name, user or tenant, depending on the grouping.
    pub key: String,
    pub tenant: String,
    pub sessions: u64,
    pub invocations: u64,
    pub active_seconds: f64,
    pub idle_seconds: f64,
    pub cpu_seconds: f64,
    /// The largest peak of any session in the group.
    pub peak_memory_bytes: u64,
}

/// Used when a list or page size of 0 is asked for.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// The most rows one list or page returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// Turns a caller's limit into the one applied.
pub(crate) fn effective_limit(limit: usize) -> usize {
    match limit {
        0 => DEFAULT_LIST_LIMIT,
        n => n.min(MAX_LIST_LIMIT),
    }
}

/// The durable, append-only record of every session. See the crate docs.
#[async_trait::async_trait]
pub trait SessionLog: Send + Sync + 'static {
    /// Start a new activation. New id: insert the session owned by `owner`,
    /// append `Created{agent,tenant,user}`, epoch 1, `created = true`.
    /// Existing id: the owner recorded in the log must equal `owner`'s
    /// (tenant, user), else `NotFound`; bump the epoch by one, set status
    /// Provisioning, `created = false`. An existing session of another agent
    /// is a `Conflict`. Durable before it returns.
    async fn activate(
        &self,
        id: &SessionId,
        agent: &AgentName,
        owner: &Principal,
    ) -> Result<Activation, LogError>;

    /// Durable append of one event by the activation `epoch`; refuses any
    /// other epoch (`StaleEpoch`). Returns the event's seq (per session, from
    /// 1, without gaps). Updates the session row in the same transaction.
    async fn append(
        &self,
        id: &SessionId,
        epoch: u64,
        event: SessionEvent,
    ) -> Result<u64, LogError>;

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, LogError>;

    /// Newest first.
    async fn list_sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>, LogError>;

    /// Events with seq > `after`, ascending, at most `limit` (0 means the
    /// default). An unknown session has no events.
    async fn events(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, LogError>;

    /// Fires (with the session id) after each durable append. Followers
    /// re-read from their cursor after every wake-up and after `Lagged`, so
    /// they never skip.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<SessionId>;

    async fn usage(
        &self,
        group: UsageGroup,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageRow>, LogError>;

    /// Sessions whose status is not terminated (at start-up: activations a
    /// crash left open).
    async fn live_sessions(&self) -> Result<Vec<SessionRecord>, LogError>;
}
