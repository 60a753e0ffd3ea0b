//! The SQLite backend: one writer thread, group commit, WAL readers.

mod audit;
mod catalog;
mod keys;
mod ops;
mod read;
mod schema;
mod writer;

use crate::{
    Activation, LogError, SessionFilter, SessionLog, SessionRecord, UsageFilter, UsageGroup,
    UsageRow,
};
use berth_core::{AgentName, EventRecord, Principal, SessionEvent, SessionId};
use read::ReadPool;
use rusqlite::Connection;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use writer::{Command, Reply, SessionCommand, Shared, Writer};

/// Limits and settings of a [`SqliteLog`].
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The most writes committed in one transaction (default 512).
    pub max_batch: usize,
    /// Writes that may wait for the writer before callers wait to hand theirs
    /// over (default 4096).
    pub queue: usize,
    /// Wake-ups a slow subscriber may fall behind before it sees `Lagged`
    /// (default 4096).
    pub subscriber_buffer: usize,
    /// How long a connection waits for a lock held by another (default 5 s).
    pub busy_timeout: Duration,
    /// The largest the database may grow, in pages (default: no limit beyond
    /// SQLite's own). A write past it fails, and the log closes.
    pub max_pages: Option<u64>,
    /// Audit events kept; past it the oldest are dropped (default 1,000,000).
    /// Failed authentications are audited and anyone can cause them, so the
    /// table needs a bound of its own.
    pub max_audit_rows: u64,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            max_batch: 512,
            queue: 4096,
            subscriber_buffer: 4096,
            busy_timeout: Duration::from_secs(5),
            max_pages: None,
            max_audit_rows: 1_000_000,
        }
    }
}

/// The session log and catalog on one SQLite file. Cheap to clone; every
/// clone talks to the same writer thread.
#[derive(Clone)]
pub struct SqliteLog {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    writer: Option<JoinHandle<()>>,
    reads: ReadPool,
    events: broadcast::Sender<SessionId>,
    shared: Arc<Shared>,
    max_audit_rows: u64,
}

impl Drop for Inner {
    /// Lets the writer finish what is queued and waits for it, so that the
    /// file is released when the last handle goes. This can block for the
    /// length of one batch.
    fn drop(&mut self) {
        let (orphan, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commands, orphan));
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("session log writer panicked");
            }
        }
    }
}

impl SqliteLog {
    /// Opens (creating if needed) the database at `path` with the default
    /// config. Blocking: call at start-up.
    pub fn open(path: &Path) -> Result<SqliteLog, LogError> {
        Self::open_with(path, &SqliteConfig::default())
    }

    pub fn open_with(path: &Path, config: &SqliteConfig) -> Result<SqliteLog, LogError> {
        let conn = schema::open_writer(path, config.busy_timeout, config.max_pages)?;
        let (commands, receiver) = mpsc::channel(config.queue.max(1));
        let (events, _) = broadcast::channel(config.subscriber_buffer.max(1));
        let shared = Arc::new(Shared {
            closed: Default::default(),
            stats: Default::default(),
            keys: Default::default(),
        });
        let writer = Writer {
            conn,
            commands: receiver,
            notify: events.clone(),
            shared: shared.clone(),
            max_batch: config.max_batch.max(1),
        };
        let handle = std::thread::Builder::new()
            .name("berth-log-writer".to_owned())
            .spawn(move || writer.run())
            // Only fails if the OS will not give us a thread; without one
            // the log can acknowledge nothing.
            .map_err(|e| {
                tracing::error!(error = %e, "cannot start the session log writer");
                LogError::Closed
            })?;
        let reads = ReadPool::new(path.to_owned(), config.busy_timeout);
        let inner = Inner {
            commands,
            writer: Some(handle),
            reads,
            events,
            shared,
            max_audit_rows: config.max_audit_rows,
        };
        Ok(SqliteLog {
            inner: Arc::new(inner),
        })
    }

    /// Transactions committed so far: fewer than writes when group commit
    /// shares them.
    pub fn commits(&self) -> u64 {
        self.inner.shared.stats.commits.load(Ordering::Relaxed)
    }

    /// Writes (appends, activations, catalog changes) committed so far.
    pub fn writes(&self) -> u64 {
        self.inner.shared.stats.commands.load(Ordering::Relaxed)
    }

    /// Whether the writer has stopped after a failure.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::SeqCst)
    }

    /// Hands a command to the writer and waits for its reply, which comes
    /// after the commit.
    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, LogError> {
        if self.is_closed() {
            return Err(LogError::Closed);
        }
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(command(reply))
            .await
            .map_err(|_| LogError::Closed)?;
        // A dropped reply means the writer stopped before running it.
        answer.await.map_err(|_| LogError::Closed)?
    }

    /// Runs a query on a reader connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || inner.reads.run(query)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(LogError::Closed),
        }
    }
}

#[async_trait::async_trait]
impl SessionLog for SqliteLog {
    async fn activate(
        &self,
        id: &SessionId,
        agent: &AgentName,
        owner: &Principal,
    ) -> Result<Activation, LogError> {
        self.call(|reply| {
            Command::Session(SessionCommand::Activate {
                id: id.clone(),
                agent: agent.clone(),
                tenant: owner.tenant().clone(),
                user: owner.user().clone(),
                reply,
            })
        })
        .await
    }

    async fn append(
        &self,
        id: &SessionId,
        epoch: u64,
        event: SessionEvent,
    ) -> Result<u64, LogError> {
        self.call(|reply| {
            Command::Session(SessionCommand::Append {
                id: id.clone(),
                epoch,
                event,
                reply,
            })
        })
        .await
    }

    async fn session(&self, id: &SessionId) -> Result<Option<SessionRecord>, LogError> {
        let id = id.clone();
        self.read(move |conn| read::session(conn, id.as_str()))
            .await
    }

    async fn list_sessions(&self, filter: &SessionFilter) -> Result<Vec<SessionRecord>, LogError> {
        let filter = filter.clone();
        self.read(move |conn| read::list_sessions(conn, &filter))
            .await
    }

    async fn events(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, LogError> {
        let id = id.clone();
        self.read(move |conn| read::events(conn, &id, after, limit))
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<SessionId> {
        self.inner.events.subscribe()
    }

    async fn usage(
        &self,
        group: UsageGroup,
        filter: &UsageFilter,
    ) -> Result<Vec<UsageRow>, LogError> {
        let filter = filter.clone();
        self.read(move |conn| read::usage(conn, group, &filter))
            .await
    }

    async fn live_sessions(&self) -> Result<Vec<SessionRecord>, LogError> {
        self.read(read::live_sessions).await
    }
}
