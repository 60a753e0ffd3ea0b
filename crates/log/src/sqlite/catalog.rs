//! The catalog on the log's database: agents, versions and API keys. Writes
//! go through the writer thread like appends, so they are durable when they
//! return; reads go to the reader pool.

use super::read::stored;
use super::writer::{CatalogCommand, Command};
use super::SqliteLog;
use crate::{AgentRecord, ApiKeyRecord, LogError, VersionRecord};
use berth_core::{AgentName, TenantId, UserId};
use rusqlite::{params, Connection, Row};

/// `agents` columns plus the live versions, as `agent_from_row` reads them.
const AGENT_QUERY: &str = "SELECT name, \
     (SELECT MAX(version) FROM versions v WHERE v.agent = a.name), \
     (SELECT COUNT(*) FROM versions v WHERE v.agent = a.name), \
     created_at_ms, updated_at_ms FROM agents a WHERE deleted = 0";

const VERSION_COLUMNS: &str = "agent, version, manifest_json, dir, created_at_ms";

const KEY_COLUMNS: &str = "id, hash, tenant, user_id, roles, created_at_ms, revoked";

impl SqliteLog {
    /// Deploys a new version of `agent` (creating the agent if needed) with
    /// the next number, which is never one handed out before.
    pub async fn create_version(
        &self,
        agent: &AgentName,
        manifest_json: &str,
        dir: &str,
    ) -> Result<VersionRecord, LogError> {
        self.call(|reply| {
            Command::Catalog(CatalogCommand::CreateVersion {
                agent: agent.clone(),
                manifest_json: manifest_json.to_owned(),
                dir: dir.to_owned(),
                reply,
            })
        })
        .await
    }

    /// The agent, unless it never existed or was deleted.
    pub async fn agent(&self, name: &AgentName) -> Result<Option<AgentRecord>, LogError> {
        let name = name.clone();
        self.read(move |conn| {
            let sql = format!("{AGENT_QUERY} AND name = ?1");
            Ok(query(conn, &sql, [name.as_str()], agent_from_row)?.pop())
        })
        .await
    }

    pub async fn list_agents(&self) -> Result<Vec<AgentRecord>, LogError> {
        self.read(|conn| {
            let sql = format!("{AGENT_QUERY} ORDER BY name");
            query(conn, &sql, [], agent_from_row)
        })
        .await
    }

    /// The agent's versions that are not deleted, oldest first.
    pub async fn versions(&self, name: &AgentName) -> Result<Vec<VersionRecord>, LogError> {
        let name = name.clone();
        self.read(move |conn| {
            let sql =
                format!("SELECT {VERSION_COLUMNS} FROM versions WHERE agent = ?1 ORDER BY version");
            query(conn, &sql, [name.as_str()], version_from_row)
        })
        .await
    }

    pub async fn version(
        &self,
        name: &AgentName,
        version: u64,
    ) -> Result<Option<VersionRecord>, LogError> {
        let name = name.clone();
        self.read(move |conn| {
            let sql =
                format!("SELECT {VERSION_COLUMNS} FROM versions WHERE agent = ?1 AND version = ?2");
            Ok(query(
                conn,
                &sql,
                params![name.as_str(), version],
                version_from_row,
            )?
            .pop())
        })
        .await
    }

    /// The `DEFAULT` endpoint: the newest version not deleted.
    pub async fn latest_version(
        &self,
        name: &AgentName,
    ) -> Result<Option<VersionRecord>, LogError> {
        let name = name.clone();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {VERSION_COLUMNS} FROM versions WHERE agent = ?1 \
                 ORDER BY version DESC LIMIT 1"
            );
            Ok(query(conn, &sql, [name.as_str()], version_from_row)?.pop())
        })
        .await
    }

    /// True if the version existed. Its number is not reused.
    pub async fn delete_version(&self, name: &AgentName, version: u64) -> Result<bool, LogError> {
        self.call(|reply| {
            Command::Catalog(CatalogCommand::DeleteVersion {
                agent: name.clone(),
                version,
                reply,
            })
        })
        .await
    }

    /// Deletes the agent and all its versions; true if it existed. Deploying
    /// it again continues its version numbers.
    pub async fn delete_agent(&self, name: &AgentName) -> Result<bool, LogError> {
        self.call(|reply| {
            Command::Catalog(CatalogCommand::DeleteAgent {
                agent: name.clone(),
                reply,
            })
        })
        .await
    }

    /// Stores a key; `Conflict` if its id or hash is taken.
    pub async fn insert_api_key(&self, key: &ApiKeyRecord) -> Result<(), LogError> {
        self.call(|reply| {
            Command::Catalog(CatalogCommand::InsertApiKey {
                key: key.clone(),
                reply,
            })
        })
        .await
    }

    /// The key with this hash, revoked or not (the caller checks), served
    /// from memory when it can be.
    pub async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, LogError> {
        let generation = match self.inner.shared.keys.get(hash) {
            Ok(key) => return Ok(Some(key)),
            Err(generation) => generation,
        };
        let owned = hash.to_owned();
        let found = self
            .read(move |conn| {
                let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = ?1");
                Ok(query(conn, &sql, [owned.as_str()], key_from_row)?.pop())
            })
            .await?;
        if let Some(key) = &found {
            self.inner.shared.keys.put(generation, key.clone());
        }
        Ok(found)
    }

    /// The key with this id, revoked or not (the caller checks). Always read
    /// from the database, so a revocation is seen at once.
    pub async fn api_key_by_id(&self, id: &str) -> Result<Option<ApiKeyRecord>, LogError> {
        let owned = id.to_owned();
        self.read(move |conn| {
            let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1");
            Ok(query(conn, &sql, [owned.as_str()], key_from_row)?.pop())
        })
        .await
    }

    /// Revokes the key; true if it exists. In force when this returns.
    pub async fn revoke_api_key(&self, id: &str) -> Result<bool, LogError> {
        self.call(|reply| {
            Command::Catalog(CatalogCommand::RevokeApiKey {
                id: id.to_owned(),
                reply,
            })
        })
        .await
    }

    /// Keys of one tenant, or of all, oldest first.
    pub async fn list_api_keys(
        &self,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<ApiKeyRecord>, LogError> {
        let tenant = tenant.cloned();
        self.read(move |conn| {
            let sql = format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE ?1 IS NULL OR tenant = ?1 \
                 ORDER BY created_at_ms, id"
            );
            query(
                conn,
                &sql,
                [tenant.as_ref().map(|t| t.as_str())],
                key_from_row,
            )
        })
        .await
    }
}

/// Runs a query and maps each row with a mapper that may find corrupt data.
fn query<T>(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
    map: fn(&Row<'_>) -> Result<T, LogError>,
) -> Result<Vec<T>, LogError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(args)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}

fn agent_from_row(row: &Row<'_>) -> Result<AgentRecord, LogError> {
    Ok(AgentRecord {
        name: stored("agent", &row.get::<_, String>(0)?, AgentName::parse)?,
        latest_version: row.get(1)?,
        versions: row.get(2)?,
        created_at_ms: row.get(3)?,
        updated_at_ms: row.get(4)?,
    })
}

fn version_from_row(row: &Row<'_>) -> Result<VersionRecord, LogError> {
    Ok(VersionRecord {
        agent: stored("agent", &row.get::<_, String>(0)?, AgentName::parse)?,
        version: row.get(1)?,
        manifest_json: row.get(2)?,
        dir: row.get(3)?,
        created_at_ms: row.get(4)?,
    })
}

fn key_from_row(row: &Row<'_>) -> Result<ApiKeyRecord, LogError> {
    let id: String = row.get(0)?;
    let roles: String = row.get(4)?;
    Ok(ApiKeyRecord {
        hash: row.get(1)?,
        tenant: stored("tenant", &row.get::<_, String>(2)?, TenantId::parse)?,
        user: stored("user", &row.get::<_, String>(3)?, UserId::parse)?,
        roles: serde_json::from_str(&roles)
            .map_err(|e| LogError::Corrupt(format!("roles of API key {id}: {e}")))?,
        created_at_ms: row.get(5)?,
        revoked: row.get(6)?,
        id,
    })
}
