//! The writes, run by the writer thread inside its batch transaction. Each
//! reads what it needs in the same transaction, so it sees the effects of the
//! commands before it in the batch.

use super::read;
use crate::{Activation, ApiKeyRecord, LogError, VersionRecord};
use berth_core::{AgentName, SessionEvent, SessionId, TenantId, UserId};
use rusqlite::{params, Connection, OptionalExtension};

pub(super) fn activate(
    conn: &Connection,
    id: &SessionId,
    agent: &AgentName,
    tenant: &TenantId,
    user: &UserId,
    now: i64,
) -> Result<Activation, LogError> {
    let stored: Option<(String, String, String)> = conn
        .prepare_cached("SELECT tenant, user_id, agent FROM sessions WHERE id = ?1")?
        .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let created = match stored {
        None => {
            create_session(conn, id, agent, tenant, user, now)?;
            true
        }
        Some((t, u, a)) => {
            // The owner comes from the log, never from the request; a session
            // of someone else must look exactly like a missing one.
            if t != tenant.as_str() || u != user.as_str() {
                return Err(LogError::NotFound);
            }
            if a != agent.as_str() {
                return Err(LogError::Conflict("the session belongs to another agent"));
            }
            conn.prepare_cached(
                "UPDATE sessions SET epoch = epoch + 1, activations = activations + 1, \
                 status = 'provisioning', termination_reason = NULL, updated_at_ms = ?2 \
                 WHERE id = ?1",
            )?
            .execute(params![id.as_str(), now])?;
            false
        }
    };
    // Just written in this transaction, so it is there.
    let record = read::session(conn, id.as_str())?.ok_or(LogError::NotFound)?;
    Ok(Activation {
        epoch: record.epoch,
        created,
        record,
    })
}

fn create_session(
    conn: &Connection,
    id: &SessionId,
    agent: &AgentName,
    tenant: &TenantId,
    user: &UserId,
    now: i64,
) -> Result<(), LogError> {
    conn.prepare_cached(
        "INSERT INTO sessions (id, agent, tenant, user_id, status, epoch, activations, \
         created_at_ms, updated_at_ms, last_seq) \
         VALUES (?1, ?2, ?3, ?4, 'provisioning', 1, 1, ?5, ?5, 0)",
    )?
    .execute(params![
        id.as_str(),
        agent.as_str(),
        tenant.as_str(),
        user.as_str(),
        now
    ])?;
    let created = SessionEvent::Created {
        agent: agent.clone(),
        tenant: tenant.clone(),
        user: user.clone(),
    };
    append(conn, id, 1, &created, now)?;
    Ok(())
}

/// Appends one event by the activation `epoch` and folds it into the
/// session row. Returns the event's seq.
pub(super) fn append(
    conn: &Connection,
    id: &SessionId,
    epoch: u64,
    event: &SessionEvent,
    now: i64,
) -> Result<u64, LogError> {
    let (current, last_seq) = read::epoch_and_seq(conn, id.as_str())?.ok_or(LogError::NotFound)?;
    if epoch != current {
        return Err(LogError::StaleEpoch {
            current,
            got: epoch,
        });
    }
    let seq = last_seq + 1;
    let body = encode(event)?;
    conn.prepare_cached(
        "INSERT INTO events (session_id, seq, epoch, at_ms, kind, body) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id.as_str(), seq, epoch, now, event.kind(), body])?;
    conn.prepare_cached("UPDATE sessions SET last_seq = ?2, updated_at_ms = ?3 WHERE id = ?1")?
        .execute(params![id.as_str(), seq, now])?;
    fold(conn, id.as_str(), event)?;
    Ok(seq)
}

/// Serializes an event, refusing one that would not parse back: serde_json
/// writes NaN and infinities as `null`, and a stored event that cannot be
/// read would break every follower of the session.
fn encode(event: &SessionEvent) -> Result<String, LogError> {
    let body = serde_json::to_string(event)
        .map_err(|e| LogError::Corrupt(format!("event does not serialize: {e}")))?;
    serde_json::from_str::<SessionEvent>(&body)
        .map_err(|e| LogError::Corrupt(format!("event would not read back: {e}")))?;
    Ok(body)
}

/// Keeps the session row's state and totals in step with its events.
fn fold(conn: &Connection, id: &str, event: &SessionEvent) -> rusqlite::Result<()> {
    let run = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<()> {
        let mut all: Vec<&dyn rusqlite::ToSql> = vec![&id];
        all.extend_from_slice(p);
        conn.prepare_cached(sql)?.execute(all.as_slice()).map(drop)
    };
    match event {
        SessionEvent::StatusChanged { to, .. } => run(
            "UPDATE sessions SET status = ?2 WHERE id = ?1",
            &[&to.as_str()],
        ),
        SessionEvent::Terminated { reason, .. } => run(
            "UPDATE sessions SET status = 'terminated', termination_reason = ?2 WHERE id = ?1",
            &[&reason.as_str()],
        ),
        SessionEvent::SandboxStarted {
            agent_version,
            substrate,
            ..
        } => run(
            "UPDATE sessions SET agent_version = ?2, substrate = ?3 WHERE id = ?1",
            &[agent_version, substrate],
        ),
        SessionEvent::Usage(u) => run(
            "UPDATE sessions SET active_seconds = active_seconds + ?2, \
             idle_seconds = idle_seconds + ?3, cpu_seconds = cpu_seconds + ?4, \
             peak_memory_bytes = MAX(peak_memory_bytes, ?5) WHERE id = ?1",
            &[
                &u.active_seconds,
                &u.idle_seconds,
                &u.cpu_seconds,
                &u.peak_memory_bytes,
            ],
        ),
        SessionEvent::InvocationReceived { .. } => run(
            "UPDATE sessions SET invocations = invocations + 1 WHERE id = ?1",
            &[],
        ),
        SessionEvent::Created { .. } | SessionEvent::InvocationCompleted { .. } => Ok(()),
    }
}

pub(super) fn create_version(
    conn: &Connection,
    agent: &AgentName,
    manifest_json: &str,
    dir: &str,
    now: i64,
) -> Result<VersionRecord, LogError> {
    conn.prepare_cached(
        "INSERT INTO agents (name, next_version, deleted, created_at_ms, updated_at_ms) \
         VALUES (?1, 1, 0, ?2, ?2) ON CONFLICT (name) DO NOTHING",
    )?
    .execute(params![agent.as_str(), now])?;
    // A deleted agent that is deployed again starts afresh, except for its
    // version counter, so that no version number is ever handed out twice.
    conn.prepare_cached(
        "UPDATE agents SET deleted = 0, created_at_ms = ?2 WHERE name = ?1 AND deleted = 1",
    )?
    .execute(params![agent.as_str(), now])?;
    let version: u64 = conn
        .prepare_cached(
            "UPDATE agents SET next_version = next_version + 1, updated_at_ms = ?2 \
             WHERE name = ?1 RETURNING next_version - 1",
        )?
        .query_row(params![agent.as_str(), now], |r| r.get(0))?;
    conn.prepare_cached(
        "INSERT INTO versions (agent, version, manifest_json, dir, created_at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![agent.as_str(), version, manifest_json, dir, now])?;
    Ok(VersionRecord {
        agent: agent.clone(),
        version,
        manifest_json: manifest_json.to_owned(),
        dir: dir.to_owned(),
        created_at_ms: now,
    })
}

pub(super) fn delete_version(
    conn: &Connection,
    agent: &AgentName,
    version: u64,
    now: i64,
) -> Result<bool, LogError> {
    let gone = conn
        .prepare_cached("DELETE FROM versions WHERE agent = ?1 AND version = ?2")?
        .execute(params![agent.as_str(), version])?;
    if gone > 0 {
        conn.prepare_cached("UPDATE agents SET updated_at_ms = ?2 WHERE name = ?1")?
            .execute(params![agent.as_str(), now])?;
    }
    Ok(gone > 0)
}

/// Deletes the agent's versions and leaves its row as a tombstone that keeps
/// the version counter.
pub(super) fn delete_agent(
    conn: &Connection,
    agent: &AgentName,
    now: i64,
) -> Result<bool, LogError> {
    let hit = conn
        .prepare_cached(
            "UPDATE agents SET deleted = 1, updated_at_ms = ?2 WHERE name = ?1 AND deleted = 0",
        )?
        .execute(params![agent.as_str(), now])?;
    conn.prepare_cached("DELETE FROM versions WHERE agent = ?1")?
        .execute([agent.as_str()])?;
    Ok(hit > 0)
}

pub(super) fn insert_api_key(conn: &Connection, key: &ApiKeyRecord) -> Result<(), LogError> {
    let taken = conn
        .prepare_cached("SELECT 1 FROM api_keys WHERE id = ?1 OR hash = ?2")?
        .exists(params![key.id, key.hash])?;
    if taken {
        return Err(LogError::Conflict("an API key with this id or hash exists"));
    }
    let roles = serde_json::to_string(&key.roles)
        .map_err(|e| LogError::Corrupt(format!("roles do not serialize: {e}")))?;
    conn.prepare_cached(
        "INSERT INTO api_keys (id, hash, tenant, user_id, roles, created_at_ms, revoked) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        key.id,
        key.hash,
        key.tenant.as_str(),
        key.user.as_str(),
        roles,
        key.created_at_ms,
        key.revoked
    ])?;
    Ok(())
}

/// Marks the key revoked; true if it exists (revoking twice is not an error).
pub(super) fn revoke_api_key(conn: &Connection, id: &str) -> Result<bool, LogError> {
    let hit = conn
        .prepare_cached("UPDATE api_keys SET revoked = 1 WHERE id = ?1")?
        .execute([id])?;
    Ok(hit > 0)
}
