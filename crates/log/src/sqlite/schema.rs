//! The database schema and connection settings.

use rusqlite::Connection;
use std::time::Duration;

/// Created on open if missing. `sessions` carries the running totals that
/// appends keep up to date, so listing and usage never replay events.
/// `agents` rows are kept as tombstones after a delete, because their
/// `next_version` is what stops version numbers from being reused.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id                 TEXT PRIMARY KEY,
    agent              TEXT NOT NULL,
    tenant             TEXT NOT NULL,
    user_id            TEXT NOT NULL,
    status             TEXT NOT NULL,
    epoch              INTEGER NOT NULL,
    activations        INTEGER NOT NULL,
    agent_version      INTEGER,
    substrate          TEXT,
    created_at_ms      INTEGER NOT NULL,
    updated_at_ms      INTEGER NOT NULL,
    last_seq           INTEGER NOT NULL,
    termination_reason TEXT,
    active_seconds     REAL NOT NULL DEFAULT 0,
    idle_seconds       REAL NOT NULL DEFAULT 0,
    cpu_seconds        REAL NOT NULL DEFAULT 0,
    peak_memory_bytes  INTEGER NOT NULL DEFAULT 0,
    invocations        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (tenant, user_id, created_at_ms);
CREATE INDEX IF NOT EXISTS sessions_agent ON sessions (agent, created_at_ms);
CREATE INDEX IF NOT EXISTS sessions_status ON sessions (status);
CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created_at_ms);

CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    epoch      INTEGER NOT NULL,
    at_ms      INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS agents (
    name          TEXT PRIMARY KEY,
    next_version  INTEGER NOT NULL,
    deleted       INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS versions (
    agent         TEXT NOT NULL,
    version       INTEGER NOT NULL,
    manifest_json TEXT NOT NULL,
    dir           TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (agent, version)
);

CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    hash          TEXT NOT NULL UNIQUE,
    tenant        TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    roles         TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant, created_at_ms);

-- Audit events; tenant and user are NULL for a failed authentication.
-- AUTOINCREMENT keeps ids from being reused after old rows are pruned, so a
-- reader's `after` cursor never skips.
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    tenant  TEXT,
    user_id TEXT,
    action  TEXT NOT NULL,
    target  TEXT,
    outcome TEXT NOT NULL,
    reason  TEXT,
    source  TEXT
);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, id);
";

/// Settings every connection gets. WAL lets readers run beside the writer;
/// `synchronous = FULL` makes every commit fsync the WAL, which is what makes
/// an acknowledged append durable.
fn configure(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// The writer's connection; creates the schema.
pub(super) fn open_writer(
    path: &std::path::Path,
    busy_timeout: Duration,
    max_pages: Option<u64>,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn, busy_timeout)?;
    if let Some(pages) = max_pages {
        conn.pragma_update(None, "max_page_count", pages)?;
    }
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// A reader's connection. `query_only` makes a stray write through it an
/// error instead of a write that bypasses the writer.
pub(super) fn open_reader(
    path: &std::path::Path,
    busy_timeout: Duration,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn, busy_timeout)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}
