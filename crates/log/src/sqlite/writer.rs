//! The writer thread: the only owner of the write connection. It runs
//! commands in batches, one transaction (and one fsync) per batch, and
//! replies only after the commit.

use super::keys::KeyCache;
use super::{audit, ops};
use crate::{Activation, ApiKeyRecord, AuditDraft, LogError, VersionRecord};
use berth_core::{now_ms, AgentName, SessionEvent, SessionId, TenantId, UserId};
use rusqlite::{Connection, ErrorCode, Savepoint, Transaction, TransactionBehavior};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, oneshot};

pub(super) type Reply<T> = oneshot::Sender<Result<T, LogError>>;

/// A write, with the channel its result goes back on. Every command is legal
/// at any time; what a command may do to a session is checked by the writer.
pub(super) enum Command {
    Session(SessionCommand),
    Catalog(CatalogCommand),
    /// Store one audit event, then drop all but the newest `keep`.
    Audit {
        draft: AuditDraft,
        keep: u64,
        reply: Reply<u64>,
    },
}

pub(super) enum SessionCommand {
    /// Create the session or start its next activation.
    Activate {
        id: SessionId,
        agent: AgentName,
        tenant: TenantId,
        user: UserId,
        reply: Reply<Activation>,
    },
    /// Append one event by the activation `epoch`.
    Append {
        id: SessionId,
        epoch: u64,
        event: SessionEvent,
        reply: Reply<u64>,
    },
}

pub(super) enum CatalogCommand {
    CreateVersion {
        agent: AgentName,
        manifest_json: String,
        dir: String,
        reply: Reply<VersionRecord>,
    },
    DeleteVersion {
        agent: AgentName,
        version: u64,
        reply: Reply<bool>,
    },
    DeleteAgent {
        agent: AgentName,
        reply: Reply<bool>,
    },
    InsertApiKey {
        key: ApiKeyRecord,
        reply: Reply<()>,
    },
    RevokeApiKey {
        id: String,
        reply: Reply<bool>,
    },
}

/// Answers with an error; a caller that stopped waiting is not an error.
fn refuse<T>(reply: Reply<T>, err: LogError) {
    let _ = reply.send(Err(err));
}

impl Command {
    /// Answers the command with an error without running it.
    fn fail(self, err: LogError) {
        match self {
            Command::Session(SessionCommand::Activate { reply, .. }) => refuse(reply, err),
            Command::Session(SessionCommand::Append { reply, .. }) => refuse(reply, err),
            Command::Catalog(CatalogCommand::CreateVersion { reply, .. }) => refuse(reply, err),
            Command::Catalog(CatalogCommand::DeleteVersion { reply, .. }) => refuse(reply, err),
            Command::Catalog(CatalogCommand::DeleteAgent { reply, .. }) => refuse(reply, err),
            Command::Catalog(CatalogCommand::InsertApiKey { reply, .. }) => refuse(reply, err),
            Command::Catalog(CatalogCommand::RevokeApiKey { reply, .. }) => refuse(reply, err),
            Command::Audit { reply, .. } => refuse(reply, err),
        }
    }
}

/// Counters, for metrics and for tests that check batching happened.
#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) commits: AtomicU64,
    pub(super) commands: AtomicU64,
}

/// What the writer shares with the handles.
pub(super) struct Shared {
    pub(super) closed: AtomicBool,
    pub(super) stats: Stats,
    pub(super) keys: KeyCache,
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) notify: broadcast::Sender<SessionId>,
    pub(super) shared: Arc<Shared>,
    pub(super) max_batch: usize,
}

impl Writer {
    /// Runs until every handle is gone or a batch fails. Returning drops the
    /// receiver, which fails every queued command with `Closed`.
    pub(super) fn run(mut self) {
        while let Some(first) = self.commands.blocking_recv() {
            let mut cmds = vec![first];
            while cmds.len() < self.max_batch {
                match self.commands.try_recv() {
                    Ok(cmd) => cmds.push(cmd),
                    Err(_) => break,
                }
            }
            let count = cmds.len() as u64;
            let (batch, failure) = execute(&mut self.conn, cmds);
            if let Some(e) = &failure {
                // Closed goes up before anyone hears of the failure, so a
                // caller that retries is refused rather than queued.
                self.shared.closed.store(true, Ordering::SeqCst);
                tracing::error!(error = %e, "session log write failed; refusing further writes");
            } else {
                self.shared.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .stats
                    .commands
                    .fetch_add(count, Ordering::Relaxed);
            }
            batch.finish(failure.as_ref(), &self.notify, &self.shared.keys);
            if failure.is_some() {
                return;
            }
        }
    }
}

/// A reply waiting for its batch's commit; called with the error if the
/// batch failed.
type Deferred = Box<dyn FnOnce(Option<&rusqlite::Error>) + Send>;

#[derive(Default)]
struct Batch {
    replies: Vec<Deferred>,
    /// Sessions that got an event, to wake followers after the commit.
    appended: Vec<SessionId>,
    keys_changed: bool,
}

/// Runs one batch in one transaction. On failure the transaction is rolled
/// back (by dropping it) and the error returned beside the replies.
fn execute(conn: &mut Connection, cmds: Vec<Command>) -> (Batch, Option<rusqlite::Error>) {
    let mut batch = Batch::default();
    let mut rest = cmds.into_iter();
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            batch.abandon(rest);
            return (batch, Some(e));
        }
    };
    let now = now_ms();
    while let Some(cmd) = rest.next() {
        if let Err(e) = run_command(&mut tx, cmd, now, &mut batch) {
            batch.abandon(rest);
            return (batch, Some(e));
        }
    }
    match tx.commit() {
        Ok(()) => (batch, None),
        Err(e) => (batch, Some(e)),
    }
}

/// Runs one command in its own savepoint, so that a command refused halfway
/// leaves nothing behind. An `Err` is a failure of the whole batch.
fn run_command(
    tx: &mut Transaction<'_>,
    cmd: Command,
    now: i64,
    batch: &mut Batch,
) -> rusqlite::Result<()> {
    let sp = tx.savepoint()?;
    match cmd {
        Command::Session(cmd) => run_session(sp, cmd, now, batch),
        Command::Catalog(cmd) => run_catalog(sp, cmd, now, batch),
        Command::Audit { draft, keep, reply } => {
            let r = audit::insert(&sp, &draft, keep, now);
            batch.settle(sp, reply, r, None)
        }
    }
}

fn run_session(
    sp: Savepoint<'_>,
    cmd: SessionCommand,
    now: i64,
    batch: &mut Batch,
) -> rusqlite::Result<()> {
    match cmd {
        SessionCommand::Activate {
            id,
            agent,
            tenant,
            user,
            reply,
        } => {
            let r = ops::activate(&sp, &id, &agent, &tenant, &user, now);
            // A new session got its `Created` event.
            let woke = matches!(&r, Ok(a) if a.created).then_some(id);
            batch.settle(sp, reply, r, woke)
        }
        SessionCommand::Append {
            id,
            epoch,
            event,
            reply,
        } => {
            let r = ops::append(&sp, &id, epoch, &event, now);
            batch.settle(sp, reply, r, Some(id))
        }
    }
}

fn run_catalog(
    sp: Savepoint<'_>,
    cmd: CatalogCommand,
    now: i64,
    batch: &mut Batch,
) -> rusqlite::Result<()> {
    match cmd {
        CatalogCommand::CreateVersion {
            agent,
            manifest_json,
            dir,
            reply,
        } => {
            let r = ops::create_version(&sp, &agent, &manifest_json, &dir, now);
            batch.settle(sp, reply, r, None)
        }
        CatalogCommand::DeleteVersion {
            agent,
            version,
            reply,
        } => {
            let r = ops::delete_version(&sp, &agent, version, now);
            batch.settle(sp, reply, r, None)
        }
        CatalogCommand::DeleteAgent { agent, reply } => {
            let r = ops::delete_agent(&sp, &agent, now);
            batch.settle(sp, reply, r, None)
        }
        CatalogCommand::InsertApiKey { key, reply } => {
            batch.keys_changed = true;
            let r = ops::insert_api_key(&sp, &key);
            batch.settle(sp, reply, r, None)
        }
        CatalogCommand::RevokeApiKey { id, reply } => {
            batch.keys_changed = true;
            let r = ops::revoke_api_key(&sp, &id);
            batch.settle(sp, reply, r, None)
        }
    }
}

impl Batch {
    /// Keeps or undoes one command's writes and queues its reply.
    fn settle<T: Send + 'static>(
        &mut self,
        mut sp: Savepoint<'_>,
        reply: Reply<T>,
        result: Result<T, LogError>,
        woke: Option<SessionId>,
    ) -> rusqlite::Result<()> {
        let result = match result {
            Err(LogError::Sqlite(e)) if is_fatal(&e, &sp) => {
                // The reply gets the batch's error, which is this one.
                self.defer(reply, Err(LogError::Closed));
                return Err(e);
            }
            r => r,
        };
        let ok = result.is_ok();
        self.defer(reply, result);
        if ok {
            self.appended.extend(woke);
            return sp.commit();
        }
        sp.rollback()?;
        sp.commit()
    }

    fn defer<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, LogError>) {
        self.replies.push(Box::new(move |failure| {
            let result = match failure {
                Some(e) => Err(replicate(e)),
                None => result,
            };
            // A caller that stopped waiting is not an error.
            let _ = reply.send(result);
        }));
    }

    /// Queues an error reply for commands that will not run.
    fn abandon(&mut self, cmds: impl Iterator<Item = Command>) {
        for cmd in cmds {
            self.replies.push(Box::new(move |failure| {
                cmd.fail(failure.map_or(LogError::Closed, replicate))
            }));
        }
    }

    /// Replies to everyone, then (if the batch committed) wakes followers.
    fn finish(
        self,
        failure: Option<&rusqlite::Error>,
        notify: &broadcast::Sender<SessionId>,
        keys: &KeyCache,
    ) {
        // Invalidate before replying, so a revoke that returned is in force.
        if self.keys_changed {
            keys.invalidate();
        }
        for reply in self.replies {
            reply(failure);
        }
        if failure.is_none() {
            for id in self.appended {
                // No subscribers is not an error.
                let _ = notify.send(id);
            }
        }
    }
}

/// Whether a database error from one command means the batch cannot be
/// trusted. Errors the request itself caused (a value out of range, a
/// constraint) are that command's alone; anything else, or a transaction that
/// SQLite rolled back on its own (it does on a full disk or an I/O error),
/// fails the batch.
fn is_fatal(e: &rusqlite::Error, conn: &Connection) -> bool {
    if conn.is_autocommit() {
        return true;
    }
    match e {
        rusqlite::Error::SqliteFailure(f, _) => f.code != ErrorCode::ConstraintViolation,
        _ => false,
    }
}

/// A copy of a batch's error for each of its requests (rusqlite's error is
/// not `Clone`).
fn replicate(e: &rusqlite::Error) -> LogError {
    match e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            LogError::Sqlite(rusqlite::Error::SqliteFailure(*f, msg.clone()))
        }
        _ => LogError::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::TerminationReason;
    use std::time::Duration;

    fn id(n: u8) -> SessionId {
        SessionId::parse(&format!("{n}").repeat(40)).unwrap()
    }

    fn activate(n: u8) -> (Command, oneshot::Receiver<Result<Activation, LogError>>) {
        let (reply, rx) = oneshot::channel();
        let cmd = SessionCommand::Activate {
            id: id(n),
            agent: AgentName::parse("echo").unwrap(),
            tenant: TenantId::parse("t").unwrap(),
            user: UserId::parse("u").unwrap(),
            reply,
        };
        (Command::Session(cmd), rx)
    }

    fn append(
        n: u8,
        epoch: u64,
        detail: usize,
    ) -> (Command, oneshot::Receiver<Result<u64, LogError>>) {
        let (reply, rx) = oneshot::channel();
        let event = SessionEvent::Terminated {
            reason: TerminationReason::Exited,
            detail: Some("x".repeat(detail)),
        };
        let cmd = SessionCommand::Append {
            id: id(n),
            epoch,
            event,
            reply,
        };
        (Command::Session(cmd), rx)
    }

    fn run(conn: &mut Connection, cmds: Vec<Command>) -> Option<rusqlite::Error> {
        let (batch, failure) = execute(conn, cmds);
        let (notify, _) = broadcast::channel(16);
        batch.finish(failure.as_ref(), &notify, &KeyCache::default());
        failure
    }

    /// A refused command in a batch leaves nothing behind and does not
    /// disturb the commands around it, which see each other's writes.
    #[test]
    fn refusals_are_per_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn =
            super::super::schema::open_writer(&path, Duration::from_secs(1), None).unwrap();
        let (a, a_rx) = activate(1);
        let (b, b_rx) = append(1, 1, 1);
        let (c, c_rx) = append(1, 5, 1);
        let (d, d_rx) = append(2, 1, 1);
        let (e, e_rx) = append(1, 1, 1);
        assert!(run(&mut conn, vec![a, b, c, d, e]).is_none());
        assert!(a_rx.blocking_recv().unwrap().unwrap().created);
        assert_eq!(b_rx.blocking_recv().unwrap().unwrap(), 2);
        assert!(matches!(
            c_rx.blocking_recv().unwrap(),
            Err(LogError::StaleEpoch { current: 1, got: 5 })
        ));
        assert!(matches!(
            d_rx.blocking_recv().unwrap(),
            Err(LogError::NotFound)
        ));
        assert_eq!(e_rx.blocking_recv().unwrap().unwrap(), 3);
    }

    /// When one command hits a full disk, every command of the batch, even
    /// those that ran fine before it, gets the error and nothing is kept.
    #[test]
    fn a_failed_batch_fails_every_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut conn =
            super::super::schema::open_writer(&path, Duration::from_secs(1), Some(32)).unwrap();
        let (a, a_rx) = activate(1);
        let (b, b_rx) = append(1, 1, 10);
        let (big, big_rx) = append(1, 1, 200_000);
        let (after, after_rx) = append(1, 1, 10);
        let failure = run(&mut conn, vec![a, b, big, after]).unwrap();
        assert_eq!(failure.sqlite_error_code(), Some(ErrorCode::DiskFull));
        let full = |r: Result<(), LogError>| match r {
            Err(LogError::Sqlite(e)) => {
                assert_eq!(e.sqlite_error_code(), Some(ErrorCode::DiskFull))
            }
            other => panic!("{other:?}"),
        };
        full(a_rx.blocking_recv().unwrap().map(drop));
        full(b_rx.blocking_recv().unwrap().map(drop));
        full(big_rx.blocking_recv().unwrap().map(drop));
        full(after_rx.blocking_recv().unwrap().map(drop));
        let sessions: i64 = conn
            .query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sessions, 0, "the batch was rolled back");
    }
}
