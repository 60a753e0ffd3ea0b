//! The session manager: finds or creates the actor of a session, checks
//! ownership before anything touches a session, and closes what a crash
//! left open.

use crate::actor::{self, ActorHandle, Reject, Submit};
use crate::body::TurnBody;
use crate::config::SessionConfig;
use crate::error::SessionError;
use crate::expiry::ExpiryHandle;
use crate::quota::{LiveCounts, Quotas};
use berth_core::manifest::Manifest;
use berth_core::{
    AgentName, EventRecord, Principal, RequestId, SessionEvent, SessionId, TerminationReason,
};
use berth_log::{
    LogError, SessionFilter, SessionLog, SessionRecord, UsageFilter, UsageGroup, UsageRow,
};
use berth_sandbox::{BoxBody, Driver, Substrates, SweepReport};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A resolved, deployed agent version: what a sandbox is started from.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: AgentName,
    pub version: u64,
    pub manifest: Manifest,
    pub app_dir: PathBuf,
    pub venv_dir: Option<PathBuf>,
}

/// One request for the agent, already shaped by the gateway (path, allowed
/// headers, session and request id headers).
pub struct Invocation {
    pub request_id: RequestId,
    pub request: http::Request<BoxBody>,
    pub bytes_in: u64,
}

/// What start-up recovery cleaned up.
#[derive(Debug)]
pub struct RecoveryReport {
    /// Activations the log still had open, now closed as `recovered`.
    pub closed_sessions: usize,
    pub sweep: SweepReport,
}

/// The live actors, keyed by session id. Every read re-checks the owner
/// stored in the handle, which came from the durable log.
#[derive(Default)]
pub(crate) struct Registry {
    live: Mutex<HashMap<SessionId, Arc<ActorHandle>>>,
}

impl Registry {
    fn get(&self, id: &SessionId) -> Option<Arc<ActorHandle>> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<ActorHandle>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every critical section is a single insert/remove/get).
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes `id` only if it still maps to the activation `epoch`.
    pub(crate) fn remove(&self, id: &SessionId, epoch: u64) {
        let mut live = self.lock();
        if live.get(id).is_some_and(|h| h.epoch == epoch) {
            live.remove(id);
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Live sessions holding a quota slot, of `who`'s tenant and of `who`.
    fn counts(&self, who: &Principal, idle_counts: bool) -> LiveCounts {
        let live = self.lock();
        let mut c = LiveCounts { tenant: 0, user: 0 };
        for h in live.values() {
            if h.tenant == *who.tenant() && h.holds_slot(idle_counts) {
                c.tenant += 1;
                if h.user == *who.user() {
                    c.user += 1;
                }
            }
        }
        c
    }

    fn all(&self) -> Vec<Arc<ActorHandle>> {
        self.lock().values().cloned().collect()
    }
}

pub(crate) struct Shared {
    pub log: Arc<dyn SessionLog>,
    pub substrates: Substrates,
    pub cfg: SessionConfig,
    pub expiry: ExpiryHandle,
    pub registry: Registry,
    pub quotas: Quotas,
}

/// Cheap handle to the session layer.
#[derive(Clone)]
pub struct SessionManager {
    shared: Arc<Shared>,
    create: Arc<tokio::sync::Mutex<()>>,
    closing: Arc<AtomicBool>,
}

/// The substrate policy, then the host: a tenant held to a stronger
/// substrate than the agent's is refused before any sandbox exists.
pub(crate) fn driver_for<'a>(
    shared: &'a Shared,
    tenant: &berth_core::TenantId,
    manifest: &Manifest,
) -> Result<&'a Arc<dyn Driver>, SessionError> {
    let policy = &shared.cfg.isolation;
    let wanted = policy.effective(manifest);
    if !policy.allows(tenant, wanted) {
        return Err(SessionError::IsolationPolicy {
            wanted: wanted.as_str(),
            required: policy.required(tenant).as_str(),
        });
    }
    shared
        .substrates
        .get(wanted.as_str())
        .map_err(SessionError::SubstrateUnavailable)
}

fn not_found(e: LogError) -> SessionError {
    match e {
        LogError::NotFound => SessionError::NotFound,
        other => SessionError::Log(other),
    }
}

impl SessionManager {
    pub fn new(log: Arc<dyn SessionLog>, substrates: Substrates, cfg: SessionConfig) -> Self {
        let shared = Shared {
            quotas: Quotas::new(cfg.quotas.clone()),
            log,
            substrates,
            cfg,
            expiry: ExpiryHandle::spawn(),
            registry: Registry::default(),
        };
        Self {
            shared: Arc::new(shared),
            create: Arc::new(tokio::sync::Mutex::new(())),
            closing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The substrates this node runs.
    pub fn substrates(&self) -> &Substrates {
        &self.shared.substrates
    }

    /// The driver sessions of `agent` run on, if `who`'s tenant may use it
    /// and this host has it.
    pub fn driver_for(
        &self,
        who: &Principal,
        manifest: &Manifest,
    ) -> Result<&Arc<dyn Driver>, SessionError> {
        driver_for(&self.shared, who.tenant(), manifest)
    }

    /// Per-version work of the agent's substrate (images, a snapshot
    /// template), done at deploy time so the first session starts fast.
    /// With a tenant, its isolation policy is checked first.
    pub async fn prepare(
        &self,
        tenant: Option<&berth_core::TenantId>,
        agent: &AgentSpec,
        progress: berth_sandbox::Progress<'_>,
    ) -> Result<(), SessionError> {
        let driver = match tenant {
            Some(t) => driver_for(&self.shared, t, &agent.manifest)?,
            None => {
                let wanted = self.shared.cfg.isolation.effective(&agent.manifest);
                self.shared
                    .substrates
                    .get(wanted.as_str())
                    .map_err(SessionError::SubstrateUnavailable)?
            }
        };
        // Any valid id: the template serves no session until it is cloned.
        let placeholder = SessionId::parse(&format!("prepare-{}", "0".repeat(32)))
            .map_err(|_| SessionError::StartFailed("placeholder id".into()))?;
        let spec = actor::sandbox_spec(&self.shared.cfg, agent, &placeholder);
        driver.prepare(&spec, progress).await?;
        Ok(())
    }

    /// Number of live sessions on this node.
    pub fn live_sessions(&self) -> usize {
        self.shared.registry.len()
    }

    /// Run once at start-up, before serving: removes what a crashed run left
    /// in the sandbox substrate and closes the activations it left open.
    pub async fn recover(&self) -> Result<RecoveryReport, SessionError> {
        let sweep = self.shared.substrates.sweep().await?;
        let open = self.shared.log.live_sessions().await?;
        let closed_sessions = open.len();
        for rec in open {
            let ev = SessionEvent::Terminated {
                reason: TerminationReason::Recovered,
                detail: Some("berth restarted while the session was live".into()),
            };
            match self.shared.log.append(&rec.id, rec.epoch, ev).await {
                Ok(_) | Err(LogError::StaleEpoch { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(RecoveryReport {
            closed_sessions,
            sweep,
        })
    }

    /// Sends one invocation to the session `id` of `agent`, starting a
    /// sandbox when the session has none. Only the session's owner may invoke.
    pub async fn invoke(
        &self,
        who: &Principal,
        id: SessionId,
        agent: &AgentSpec,
        inv: Invocation,
    ) -> Result<http::Response<TurnBody>, SessionError> {
        self.shared.quotas.invocation(who)?;
        let mut inv = Box::new(inv);
        // An actor that is terminating hands the invocation back; the next
        // attempt finds the registry without it and activates afresh.
        for _ in 0..8 {
            if self.closing.load(Ordering::Acquire) {
                return Err(SessionError::ShuttingDown);
            }
            let handle = self.actor_for(who, &id, agent).await?;
            let rx = match handle.submit(inv, self.shared.cfg.queue_depth) {
                Submit::Queued(rx) => rx,
                Submit::Full => return Err(SessionError::QueueFull(self.shared.cfg.queue_depth)),
                Submit::Gone(back) => {
                    handle.wait_done().await;
                    self.shared.registry.remove(&id, handle.epoch);
                    inv = back;
                    continue;
                }
            };
            match rx.await {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(Reject::Error(e))) => return Err(e),
                Ok(Err(Reject::Retry(back))) => inv = back,
                Err(_) => return Err(SessionError::Terminated("aborted")),
            }
        }
        Err(SessionError::Terminated("restarting"))
    }

    fn check_owner(
        who: &Principal,
        h: &ActorHandle,
        agent: &AgentName,
    ) -> Result<(), SessionError> {
        if h.tenant != *who.tenant() || h.user != *who.user() {
            return Err(SessionError::NotFound);
        }
        if h.agent != *agent {
            return Err(SessionError::AgentMismatch(h.agent.to_string()));
        }
        Ok(())
    }

    async fn actor_for(
        &self,
        who: &Principal,
        id: &SessionId,
        agent: &AgentSpec,
    ) -> Result<Arc<ActorHandle>, SessionError> {
        if let Some(h) = self.shared.registry.get(id) {
            Self::check_owner(who, &h, &agent.name)?;
            return Ok(h);
        }
        // Serialize activations so one session id never gets two actors.
        let _guard = self.create.lock().await;
        if let Some(h) = self.shared.registry.get(id) {
            Self::check_owner(who, &h, &agent.name)?;
            return Ok(h);
        }
        driver_for(&self.shared, who.tenant(), &agent.manifest)?;
        let max = self.shared.cfg.max_live_sessions;
        if self.shared.registry.len() >= max {
            return Err(SessionError::TooManySessions(max));
        }
        let counts = self
            .shared
            .registry
            .counts(who, self.shared.quotas.idle_sessions_count());
        self.shared.quotas.creation(who, counts)?;
        if let Some(rec) = self.shared.log.session(id).await? {
            if rec.tenant != *who.tenant() || rec.user != *who.user() {
                return Err(SessionError::NotFound);
            }
            if rec.agent != agent.name {
                return Err(SessionError::AgentMismatch(rec.agent.to_string()));
            }
        }
        let act = self
            .shared
            .log
            .activate(id, &agent.name, who)
            .await
            .map_err(not_found)?;
        let handle = actor::spawn(
            self.shared.clone(),
            id.clone(),
            act.epoch,
            agent.clone(),
            act.record.tenant.clone(),
            act.record.user.clone(),
        );
        self.shared
            .registry
            .lock()
            .insert(id.clone(), handle.clone());
        Ok(handle)
    }

    /// The session's record, if `who` may see it.
    pub async fn get(
        &self,
        who: &Principal,
        id: &SessionId,
    ) -> Result<SessionRecord, SessionError> {
        let rec = self
            .shared
            .log
            .session(id)
            .await?
            .ok_or(SessionError::NotFound)?;
        if !who.may_access(&rec.tenant, &rec.user) {
            return Err(SessionError::NotFound);
        }
        Ok(rec)
    }

    /// Terminates the session's sandbox now. A session without a live
    /// sandbox is not found, as AgentCore's `StopRuntimeSession` says.
    pub async fn stop(
        &self,
        who: &Principal,
        id: &SessionId,
    ) -> Result<SessionRecord, SessionError> {
        let rec = self.get(who, id).await?;
        let handle = self
            .shared
            .registry
            .get(id)
            .filter(|h| h.tenant == rec.tenant && h.user == rec.user)
            .ok_or(SessionError::NotFound)?;
        handle.stop(TerminationReason::Stopped).await;
        self.get(who, id).await
    }

    /// Events after `after`, if `who` may see the session. Never activates it.
    pub async fn events(
        &self,
        who: &Principal,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, SessionError> {
        self.get(who, id).await?;
        Ok(self.shared.log.events(id, after, limit).await?)
    }

    /// Wakes on every durable append; followers re-read from their cursor.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<SessionId> {
        self.shared.log.subscribe()
    }

    /// Sessions `who` may see: its own, or its tenant's for an admin.
    pub async fn list(
        &self,
        who: &Principal,
        mut filter: SessionFilter,
    ) -> Result<Vec<SessionRecord>, SessionError> {
        filter.tenant = Some(who.tenant().clone());
        if !who.is_admin() {
            filter.user = Some(who.user().clone());
        }
        Ok(self.shared.log.list_sessions(&filter).await?)
    }

    /// Usage `who` may see, grouped.
    pub async fn usage(
        &self,
        who: &Principal,
        group: UsageGroup,
        mut filter: UsageFilter,
    ) -> Result<Vec<UsageRow>, SessionError> {
        filter.tenant = Some(who.tenant().clone());
        if !who.is_admin() {
            filter.user = Some(who.user().clone());
        }
        Ok(self.shared.log.usage(group, &filter).await?)
    }

    /// Stops every live session (reason `shutdown`) and refuses new work.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        let all = self.shared.registry.all();
        let stops = all.iter().map(|h| h.stop(TerminationReason::Shutdown));
        futures_util::future::join_all(stops).await;
    }
}
