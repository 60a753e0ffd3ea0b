//! The catalog's records: deployed agents, their immutable versions, and API
//! keys. They live in the same database as the session log.

use berth_core::{AgentName, Role, TenantId, UserId};

/// An agent that has at least one version (or had, and was not deleted).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentRecord {
    pub name: AgentName,
    /// The `DEFAULT` endpoint: the newest version not deleted.
    pub latest_version: Option<u64>,
    /// How many versions are not deleted.
    pub versions: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One immutable deploy of an agent. Version numbers start at 1 per agent and
/// are never reused, not even after the version or the agent is deleted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VersionRecord {
    pub agent: AgentName,
    pub version: u64,
    pub manifest_json: String,
    /// Where the version's code lives on disk.
    pub dir: String,
    pub created_at_ms: i64,
}

/// An API key as stored: only its hash, never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub hash: String,
    pub tenant: TenantId,
    pub user: UserId,
    pub roles: Vec<Role>,
    pub created_at_ms: i64,
    pub revoked: bool,
}
