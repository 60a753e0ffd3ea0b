//! Queries, shared by the readers and by the writer (which reads inside its
//! transaction), and the pool of reader connections.

use super::schema;
use crate::{
    effective_limit, LogError, SessionFilter, SessionRecord, UsageFilter, UsageGroup, UsageRow,
};
use berth_core::{
    AgentName, EventRecord, IdError, SessionId, SessionStatus, TenantId, TerminationReason,
    UsageSample, UserId,
};
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Reader connections kept open between reads; more are opened on demand
/// when reads overlap, and closed afterwards.
const MAX_IDLE_READERS: usize = 4;

/// Reader connections for the blocking thread pool.
pub(super) struct ReadPool {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    pub(super) fn new(path: PathBuf, busy_timeout: Duration) -> Self {
        Self {
            path,
            busy_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on a reader connection. Blocking: call from spawn_blocking.
    pub(super) fn run<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        // A poisoned lock only means a panic elsewhere while holding it; the
        // Vec of connections is still valid.
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => schema::open_reader(&self.path, self.busy_timeout)?,
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        out
    }
}

/// The columns `session_from_row` expects, in order.
const SESSION_COLUMNS: &str = "id, agent, tenant, user_id, status, epoch, activations, \
     agent_version, substrate, created_at_ms, updated_at_ms, last_seq, termination_reason, \
     active_seconds, idle_seconds, cpu_seconds, peak_memory_bytes, invocations";

/// Parses a stored id; a failure means the database holds something berth
/// never wrote.
pub(super) fn stored<T>(
    what: &str,
    s: &str,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<T, LogError> {
    parse(s).map_err(|e| LogError::Corrupt(format!("stored {what} {s:?}: {e}")))
}

fn stored_status(s: &str) -> Result<SessionStatus, LogError> {
    SessionStatus::parse(s).ok_or_else(|| LogError::Corrupt(format!("stored status {s:?}")))
}

fn stored_reason(s: Option<String>) -> Result<Option<TerminationReason>, LogError> {
    s.map(|s| {
        serde_json::from_value(serde_json::Value::String(s.clone()))
            .map_err(|_| LogError::Corrupt(format!("stored termination reason {s:?}")))
    })
    .transpose()
}

fn session_from_row(row: &Row<'_>) -> Result<SessionRecord, LogError> {
    let text = |i: usize| row.get::<_, String>(i);
    Ok(SessionRecord {
        id: stored("session id", &text(0)?, SessionId::parse)?,
        agent: stored("agent", &text(1)?, AgentName::parse)?,
        tenant: stored("tenant", &text(2)?, TenantId::parse)?,
        user: stored("user", &text(3)?, UserId::parse)?,
        status: stored_status(&text(4)?)?,
        epoch: row.get(5)?,
        activations: row.get(6)?,
        agent_version: row.get(7)?,
        substrate: row.get(8)?,
        created_at_ms: row.get(9)?,
        updated_at_ms: row.get(10)?,
        last_seq: row.get(11)?,
        termination_reason: stored_reason(row.get(12)?)?,
        usage: UsageSample {
            active_seconds: row.get(13)?,
            idle_seconds: row.get(14)?,
            cpu_seconds: row.get(15)?,
            peak_memory_bytes: row.get(16)?,
        },
        invocations: row.get(17)?,
    })
}

/// Runs a session query and maps every row.
fn query_sessions(
    conn: &Connection,
    sql: &str,
    args: &[rusqlite::types::Value],
) -> Result<Vec<SessionRecord>, LogError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params_from_iter(args.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(session_from_row(row)?);
    }
    Ok(out)
}

pub(super) fn session(conn: &Connection, id: &str) -> Result<Option<SessionRecord>, LogError> {
    let sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1");
    let args = [rusqlite::types::Value::Text(id.to_owned())];
    Ok(query_sessions(conn, &sql, &args)?.pop())
}

/// Builds `WHERE` clauses of `column = ?` for each filter value that is set.
struct Conditions {
    clauses: Vec<String>,
    args: Vec<rusqlite::types::Value>,
}

impl Conditions {
    fn new() -> Self {
        Self {
            clauses: vec!["1 = 1".to_owned()],
            args: Vec::new(),
        }
    }

    fn eq(&mut self, column: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.args.push(rusqlite::types::Value::Text(v.to_owned()));
            self.clauses
                .push(format!("{column} = ?{}", self.args.len()));
        }
    }

    fn sql(&self) -> String {
        self.clauses.join(" AND ")
    }
}

pub(super) fn list_sessions(
    conn: &Connection,
    filter: &SessionFilter,
) -> Result<Vec<SessionRecord>, LogError> {
    let mut cond = Conditions::new();
    cond.eq("tenant", filter.tenant.as_ref().map(|t| t.as_str()));
    cond.eq("user_id", filter.user.as_ref().map(|u| u.as_str()));
    cond.eq("agent", filter.agent.as_ref().map(|a| a.as_str()));
    cond.eq("status", filter.status.map(|s| s.as_str()));
    // rowid breaks ties between sessions created in the same millisecond.
    let sql = format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE {} \
         ORDER BY created_at_ms DESC, rowid DESC LIMIT {}",
        cond.sql(),
        effective_limit(filter.limit)
    );
    query_sessions(conn, &sql, &cond.args)
}

pub(super) fn live_sessions(conn: &Connection) -> Result<Vec<SessionRecord>, LogError> {
    let sql = format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE status != 'terminated' \
         ORDER BY created_at_ms, rowid"
    );
    query_sessions(conn, &sql, &[])
}

pub(super) fn events(
    conn: &Connection,
    id: &SessionId,
    after: u64,
    limit: usize,
) -> Result<Vec<EventRecord>, LogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, epoch, at_ms, body FROM events \
         WHERE session_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let limit = effective_limit(limit) as i64;
    let mut rows = stmt.query(params![id.as_str(), after, limit])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let seq: u64 = row.get(0)?;
        let body: String = row.get(3)?;
        let event = serde_json::from_str(&body)
            .map_err(|e| LogError::Corrupt(format!("event {id}#{seq}: {e}")))?;
        out.push(EventRecord {
            session_id: id.clone(),
            seq,
            epoch: row.get(1)?,
            at_ms: row.get(2)?,
            event,
        });
    }
    Ok(out)
}

pub(super) fn usage(
    conn: &Connection,
    group: UsageGroup,
    filter: &UsageFilter,
) -> Result<Vec<UsageRow>, LogError> {
    let key = match group {
        UsageGroup::Session => "id",
        UsageGroup::Agent => "agent",
        UsageGroup::User => "user_id",
        UsageGroup::Tenant => "tenant",
    };
    let mut cond = Conditions::new();
    cond.eq("tenant", filter.tenant.as_ref().map(|t| t.as_str()));
    cond.eq("user_id", filter.user.as_ref().map(|u| u.as_str()));
    cond.eq("agent", filter.agent.as_ref().map(|a| a.as_str()));
    cond.eq("id", filter.session.as_ref().map(|s| s.as_str()));
    let sql = format!(
        "SELECT {key}, tenant, COUNT(*), SUM(invocations), SUM(active_seconds), \
         SUM(idle_seconds), SUM(cpu_seconds), MAX(peak_memory_bytes) \
         FROM sessions WHERE {} GROUP BY tenant, {key} ORDER BY tenant, {key}",
        cond.sql()
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(cond.args.iter()), |row| {
        Ok(UsageRow {
            key: row.get(0)?,
            tenant: row.get(1)?,
            sessions: row.get(2)?,
            invocations: row.get(3)?,
            active_seconds: row.get(4)?,
            idle_seconds: row.get(5)?,
            cpu_seconds: row.get(6)?,
            peak_memory_bytes: row.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The current epoch and last seq of a session, read by the writer.
pub(super) fn epoch_and_seq(conn: &Connection, id: &str) -> rusqlite::Result<Option<(u64, u64)>> {
    conn.prepare_cached("SELECT epoch, last_seq FROM sessions WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}
