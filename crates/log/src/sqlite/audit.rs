//! The audit table. Appends go through the writer like every other write,
//! so they share its group commit; reads go to the reader pool.

use super::read::stored;
use super::writer::Command;
use super::SqliteLog;
use crate::{effective_limit, AuditDraft, AuditFilter, AuditOutcome, AuditRecord, LogError};
use berth_core::{TenantId, UserId};
use rusqlite::{params, params_from_iter, Connection, Row};

impl SqliteLog {
    /// Stores one audit event, durably, and returns its id. Every string
    /// is bounded first (see [`AuditDraft::bounded`]); past
    /// `SqliteConfig::max_audit_rows` the oldest events are dropped.
    pub async fn append_audit(&self, draft: AuditDraft) -> Result<u64, LogError> {
        let draft = draft.bounded();
        let keep = self.inner.max_audit_rows;
        self.call(|reply| Command::Audit { draft, keep, reply })
            .await
    }

    /// Audit events matching `filter`, oldest first.
    pub async fn list_audit(&self, filter: AuditFilter) -> Result<Vec<AuditRecord>, LogError> {
        self.read(move |conn| list(conn, &filter)).await
    }
}

/// Inserts one (already bounded) event and prunes everything older than the
/// newest `keep`. Run by the writer inside its batch.
pub(super) fn insert(
    conn: &Connection,
    draft: &AuditDraft,
    keep: u64,
    now: i64,
) -> Result<u64, LogError> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, tenant, user_id, action, target, outcome, reason, source) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        now,
        draft.tenant.as_ref().map(TenantId::as_str),
        draft.user.as_ref().map(UserId::as_str),
        draft.action,
        draft.target,
        draft.outcome.as_str(),
        draft.reason,
        draft.source,
    ])?;
    let id = conn.last_insert_rowid();
    // Ids ascend without reuse (AUTOINCREMENT), so the oldest are a range of
    // the primary key and the delete is cheap.
    let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
    if id > keep {
        conn.prepare_cached("DELETE FROM audit WHERE id <= ?1")?
            .execute([id - keep])?;
    }
    u64::try_from(id).map_err(|_| LogError::Corrupt(format!("audit id {id}")))
}

const AUDIT_COLUMNS: &str = "id, at_ms, tenant, user_id, action, target, outcome, reason, source";

pub(super) fn list(conn: &Connection, filter: &AuditFilter) -> Result<Vec<AuditRecord>, LogError> {
    let after = i64::try_from(filter.after).unwrap_or(i64::MAX);
    let mut clauses = vec!["id > ?".to_owned()];
    let mut args = vec![rusqlite::types::Value::Integer(after)];
    if let Some(t) = &filter.tenant {
        clauses.push("tenant = ?".to_owned());
        args.push(rusqlite::types::Value::Text(t.as_str().to_owned()));
    }
    if let Some(a) = &filter.action {
        clauses.push("action = ?".to_owned());
        args.push(rusqlite::types::Value::Text(a.clone()));
    }
    let limit = effective_limit(filter.limit) as i64;
    args.push(rusqlite::types::Value::Integer(limit));
    let sql = format!(
        "SELECT {AUDIT_COLUMNS} FROM audit WHERE {} ORDER BY id LIMIT ?",
        clauses.join(" AND ")
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(args.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(from_row(row)?);
    }
    Ok(out)
}

fn from_row(row: &Row<'_>) -> Result<AuditRecord, LogError> {
    let opt = |i: usize| row.get::<_, Option<String>>(i);
    let outcome: String = row.get(6)?;
    Ok(AuditRecord {
        id: row.get(0)?,
        at_ms: row.get(1)?,
        tenant: opt(2)?
            .map(|t| stored("tenant", &t, TenantId::parse))
            .transpose()?,
        user: opt(3)?
            .map(|u| stored("user", &u, UserId::parse))
            .transpose()?,
        action: row.get(4)?,
        target: opt(5)?,
        outcome: AuditOutcome::parse(&outcome)
            .ok_or_else(|| LogError::Corrupt(format!("stored audit outcome {outcome:?}")))?,
        reason: opt(7)?,
        source: opt(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqliteConfig, MAX_AUDIT_FIELD_BYTES};

    fn draft(tenant: Option<&str>, action: &str) -> AuditDraft {
        AuditDraft {
            tenant: tenant.map(|t| TenantId::parse(t).unwrap()),
            user: tenant.map(|_| UserId::parse("alice").unwrap()),
            action: action.to_owned(),
            target: Some("echo".to_owned()),
            outcome: AuditOutcome::Denied,
            reason: Some("needs admin".to_owned()),
            source: None,
        }
    }

    fn open(dir: &tempfile::TempDir, config: &SqliteConfig) -> SqliteLog {
        SqliteLog::open_with(&dir.path().join("db"), config).unwrap()
    }

    #[tokio::test]
    async fn appends_read_back_in_order_with_ids() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir, &SqliteConfig::default());
        let a = log.append_audit(draft(Some("acme"), "access.denied")).await;
        let b = log.append_audit(draft(None, "auth.refused")).await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(b > a);
        let all = log.list_audit(AuditFilter::default()).await.unwrap();
        assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), [a, b]);
        let first = &all[0];
        assert_eq!(first.tenant.as_ref().unwrap().as_str(), "acme");
        assert_eq!(first.user.as_ref().unwrap().as_str(), "alice");
        assert_eq!(first.action, "access.denied");
        assert_eq!(first.target.as_deref(), Some("echo"));
        assert_eq!(first.outcome, AuditOutcome::Denied);
        assert_eq!(first.reason.as_deref(), Some("needs admin"));
        assert!(first.at_ms > 0);
        assert_eq!(all[1].tenant, None);
        assert_eq!(all[1].user, None);
        // Durable: a fresh handle on the file sees them.
        drop(log);
        let again = open(&dir, &SqliteConfig::default());
        assert_eq!(again.list_audit(AuditFilter::default()).await.unwrap(), all);
    }

    #[tokio::test]
    async fn filters_by_tenant_action_cursor_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir, &SqliteConfig::default());
        let mut ids = Vec::new();
        for (t, a) in [
            (Some("acme"), "agent.deploy"),
            (Some("other"), "agent.deploy"),
            (None, "auth.refused"),
            (Some("acme"), "access.denied"),
            (Some("acme"), "agent.deploy"),
        ] {
            ids.push(log.append_audit(draft(t, a)).await.unwrap());
        }
        let list = |f: AuditFilter| {
            let log = log.clone();
            async move {
                let got = log.list_audit(f).await.unwrap();
                got.iter().map(|r| r.id).collect::<Vec<_>>()
            }
        };
        let acme = Some(TenantId::parse("acme").unwrap());
        let tenant = AuditFilter {
            tenant: acme.clone(),
            ..Default::default()
        };
        assert_eq!(list(tenant).await, [ids[0], ids[3], ids[4]]);
        let action = AuditFilter {
            tenant: acme.clone(),
            action: Some("agent.deploy".to_owned()),
            ..Default::default()
        };
        assert_eq!(list(action).await, [ids[0], ids[4]]);
        let after = AuditFilter {
            after: ids[1],
            ..Default::default()
        };
        assert_eq!(list(after).await, [ids[2], ids[3], ids[4]]);
        let limit = AuditFilter {
            limit: 2,
            ..Default::default()
        };
        assert_eq!(list(limit).await, [ids[0], ids[1]]);
    }

    /// What a client sends is cut and cleaned before it is stored.
    #[tokio::test]
    async fn stored_strings_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir, &SqliteConfig::default());
        let mut d = draft(None, "auth.refused");
        d.target = Some(format!("/v1/\x1b[2J{}", "a".repeat(100_000)));
        d.reason = Some("forged\nline".to_owned());
        log.append_audit(d).await.unwrap();
        let got = log.list_audit(AuditFilter::default()).await.unwrap();
        let target = got[0].target.as_deref().unwrap();
        assert_eq!(target.len(), MAX_AUDIT_FIELD_BYTES);
        assert!(target.starts_with("/v1/[2J"));
        assert_eq!(got[0].reason.as_deref(), Some("forgedline"));
    }

    /// The table keeps only the newest events, and ids are never reused.
    #[tokio::test]
    async fn only_the_newest_events_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let config = SqliteConfig {
            max_audit_rows: 3,
            ..Default::default()
        };
        let log = open(&dir, &config);
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(log.append_audit(draft(None, "auth.refused")).await.unwrap());
        }
        let got = log.list_audit(AuditFilter::default()).await.unwrap();
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), ids[2..]);
        drop(log);
        let log = open(&dir, &config);
        let next = log.append_audit(draft(None, "auth.refused")).await.unwrap();
        assert!(next > ids[4]);
    }
}
