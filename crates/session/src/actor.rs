//! One actor per live session: it owns the sandbox, runs turns one at a
//! time in arrival order, polls health, keeps the idle and lifetime clocks,
//! meters usage, and is the only writer of its session's log.

use crate::body::{TurnBody, TurnStats};
use crate::config::SessionConfig;
use crate::error::SessionError;
use crate::manager::{AgentSpec, Invocation, Shared};
use berth_core::{
    AgentName, RequestId, SessionEvent, SessionId, SessionStatus, TenantId, TerminationReason,
    UsageSample, UserId,
};
use berth_sandbox::{BoxBody, Limits, Sandbox, SandboxSpec};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use http_body_util::BodyExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;

pub(crate) type Reply = oneshot::Sender<Result<http::Response<TurnBody>, Reject>>;

/// Why the actor did not run an invocation.
pub(crate) enum Reject {
    /// The session ended before the turn; try again with a fresh activation.
    Retry(Box<Invocation>),
    Error(SessionError),
}

/// Commands to a session actor. One channel, so their order holds.
pub(crate) enum Command {
    /// Run a turn. Legal in every state; turns run one at a time in order.
    Invoke { inv: Box<Invocation>, reply: Reply },
    /// Terminate now. Legal in every state; the reply comes once the
    /// termination is in the log.
    Stop {
        reason: TerminationReason,
        reply: oneshot::Sender<()>,
    },
    /// From the expiry task: a deadline of activation `epoch` may have passed.
    Deadline { epoch: u64 },
}

pub(crate) enum Submit {
    Queued(oneshot::Receiver<Result<http::Response<TurnBody>, Reject>>),
    Full,
    Gone(Box<Invocation>),
}

/// How the manager reaches an actor. The owner fields come from the log.
pub(crate) struct ActorHandle {
    pub tenant: TenantId,
    pub user: UserId,
    pub agent: AgentName,
    pub epoch: u64,
    tx: mpsc::Sender<Command>,
    queued: Arc<AtomicUsize>,
    done: watch::Receiver<bool>,
    /// False while the session is idle: with `idle_sessions_count = false`
    /// an idle session holds no quota slot.
    busy: Arc<AtomicBool>,
}

impl ActorHandle {
    pub(crate) fn holds_slot(&self, idle_counts: bool) -> bool {
        idle_counts || self.busy.load(Ordering::Acquire)
    }

    pub(crate) fn submit(&self, inv: Box<Invocation>, depth: usize) -> Submit {
        // `queued` counts turns admitted but not yet started.
        if self.queued.fetch_add(1, Ordering::AcqRel) >= depth {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Submit::Full;
        }
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Command::Invoke { inv, reply }) {
            Ok(()) => Submit::Queued(rx),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                match e.into_inner() {
                    Command::Invoke { inv, .. } => Submit::Gone(inv),
                    _ => Submit::Full,
                }
            }
        }
    }

    /// Waits until the actor has written its last event.
    pub(crate) async fn wait_done(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|d| *d).await;
    }

    /// Stops the actor and waits until it is gone.
    pub(crate) async fn stop(&self, reason: TerminationReason) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Stop { reason, reply }).await.is_ok() {
            let _ = rx.await;
        }
        self.wait_done().await;
    }
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    id: SessionId,
    epoch: u64,
    agent: AgentSpec,
    tenant: TenantId,
    user: UserId,
) -> Arc<ActorHandle> {
    // Room for the queued turns plus control commands.
    let (tx, rx) = mpsc::channel(shared.cfg.queue_depth + 16);
    let queued = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicBool::new(true));
    let (done_tx, done) = watch::channel(false);
    let handle = Arc::new(ActorHandle {
        tenant: tenant.clone(),
        user: user.clone(),
        agent: agent.name.clone(),
        epoch,
        tx: tx.clone(),
        queued: queued.clone(),
        done,
        busy: busy.clone(),
    });
    let span = tracing::info_span!("session", tenant = %tenant, session = %id, epoch);
    let actor = Actor {
        log_tail: futures_util::stream::FuturesOrdered::new(),
        shared,
        id,
        tenant,
        user,
        busy,
        epoch,
        agent,
        rx,
        tx,
        queued,
        done_tx,
        clock: Clock::new(),
        pending: VecDeque::new(),
        stop: None,
        stop_waiters: Vec::new(),
        agent_busy: false,
        agent_last_update: None,
        ping_failures: 0,
        reported_deadline: None,
    };
    tokio::spawn(actor.run().instrument(span));
    handle
}

/// Active and idle time of the activation, and the status it is in.
struct Clock {
    status: SessionStatus,
    since: Instant,
    active: Duration,
    idle: Duration,
    started: Instant,
    /// When the idle clock last restarted: end of a turn or a fresh agent
    /// status update.
    last_activity: Instant,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            status: SessionStatus::Provisioning,
            since: now,
            active: Duration::ZERO,
            idle: Duration::ZERO,
            started: now,
            last_activity: now,
        }
    }

    /// Moves to `to`, returning the event to log if it is a change.
    fn set(&mut self, to: SessionStatus) -> Option<SessionEvent> {
        if self.status == to || !self.status.can_transition(to) {
            return None;
        }
        let now = Instant::now();
        self.account(now);
        let from = self.status;
        self.status = to;
        Some(SessionEvent::StatusChanged { from, to })
    }

    fn account(&mut self, now: Instant) {
        let spent = now.saturating_duration_since(self.since);
        match self.status {
            SessionStatus::Active => self.active += spent,
            SessionStatus::Idle => self.idle += spent,
            _ => {}
        }
        self.since = now;
    }
}

struct Actor {
    /// Log appends already handed to the writer whose commit is awaited
    /// off the turn's path, in order.
    log_tail: futures_util::stream::FuturesOrdered<BoxFuture<'static, ()>>,
    shared: Arc<Shared>,
    id: SessionId,
    tenant: TenantId,
    user: UserId,
    busy: Arc<AtomicBool>,
    epoch: u64,
    agent: AgentSpec,
    rx: mpsc::Receiver<Command>,
    tx: mpsc::Sender<Command>,
    queued: Arc<AtomicUsize>,
    done_tx: watch::Sender<bool>,
    clock: Clock,
    pending: VecDeque<(Box<Invocation>, Reply)>,
    stop: Option<(TerminationReason, Option<String>)>,
    stop_waiters: Vec<oneshot::Sender<()>>,
    agent_busy: bool,
    agent_last_update: Option<i64>,
    ping_failures: u32,
    reported_deadline: Option<Instant>,
}

/// Result of a `/ping`.
enum Health {
    Healthy {
        busy: bool,
        last_update: Option<i64>,
    },
    Failed(String),
}

/// What a finished turn reports back to the actor.
struct TurnOutcome {
    request_id: RequestId,
    status: u16,
    stats: TurnStats,
    started: Instant,
}

impl Actor {
    async fn run(mut self) {
        let sandbox = match self.provision().await {
            Ok(sb) => Arc::new(sb),
            Err(detail) => {
                tracing::warn!(%detail, "sandbox start failed");
                self.stop = Some((TerminationReason::StartFailed, Some(detail.clone())));
                self.finish(None, Some(SessionError::StartFailed(detail)))
                    .await;
                return;
            }
        };
        self.serve(&sandbox).await;
        self.finish(Some(sandbox), None).await;
    }

    async fn append(&mut self, ev: SessionEvent) {
        if let Err(e) = self.shared.log.append(&self.id, self.epoch, ev).await {
            // A stale epoch or a closed log means this activation may no
            // longer act; the serve loop stops on the next check.
            tracing::error!(error = %e, "session log append failed");
        }
    }

    /// Starts the sandbox and waits until the agent answers `/ping` healthy.
    async fn provision(&mut self) -> Result<Sandbox, String> {
        let t0 = Instant::now();
        let driver = crate::manager::driver_for(&self.shared, &self.tenant, &self.agent.manifest)
            .map_err(|e| e.to_string())?
            .clone();
        let sandbox = driver
            .start(sandbox_spec(&self.shared.cfg, &self.agent, &self.id))
            .await
            .map_err(|e| format!("sandbox did not start: {e}"))?;
        let sandbox_ms = sandbox.start_time().as_secs_f64() * 1e3;
        let timeout = Duration::from_secs(self.agent.manifest.lifecycle.start_timeout_s);
        if let Err(detail) = wait_healthy(&sandbox, t0 + timeout).await {
            let _ = sandbox.terminate(Duration::ZERO).await;
            return Err(detail);
        }
        let agent_ms = t0.elapsed().as_secs_f64() * 1e3 - sandbox_ms;
        self.clock.started = Instant::now();
        self.clock.last_activity = self.clock.started;
        self.append(SessionEvent::SandboxStarted {
            agent_version: self.agent.version,
            substrate: driver.substrate().to_owned(),
            epoch: self.epoch,
            sandbox_ms,
            agent_ms,
        })
        .await;
        if let Some(ev) = self.set_status(SessionStatus::Idle) {
            self.append(ev).await;
        }
        tracing::info!(sandbox_ms, agent_ms, "sandbox started");
        Ok(sandbox)
    }

    /// The serve loop: turns, pings, deadlines, commands, until a stop.
    async fn serve(&mut self, sandbox: &Arc<Sandbox>) {
        let mut turn: Option<BoxFuture<'static, TurnOutcome>> = None;
        let mut ping: Option<BoxFuture<'static, Health>> = None;
        let mut ticker = tokio::time::interval(self.shared.cfg.ping_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut exited = sandbox.exited();
        while self.stop.is_none() {
            if turn.is_none() {
                turn = self.start_turn(sandbox).await;
            }
            self.check_deadlines(turn.is_some());
            if self.stop.is_some() {
                break;
            }
            tokio::select! {
                Some(()) = self.log_tail.next(), if !self.log_tail.is_empty() => {}
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => self.stop = Some((TerminationReason::Shutdown, None)),
                },
                // The branch guards make the `expect`s below unreachable.
                outcome = async { turn.as_mut().expect("guarded").await }, if turn.is_some() => {
                    turn = None;
                    self.end_turn(outcome).await;
                }
                health = async { ping.as_mut().expect("guarded").await }, if ping.is_some() => {
                    ping = None;
                    self.on_health(health, turn.is_some()).await;
                }
                _ = ticker.tick(), if ping.is_none() => {
                    ping = Some(ping_future(sandbox.clone(), self.shared.cfg.ping_timeout));
                }
                _ = async { let _ = exited.wait_for(|e| *e).await; } => {
                    self.stop = Some((TerminationReason::Exited, Some("the agent process exited".into())));
                }
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Invoke { inv, reply } => self.pending.push_back((inv, reply)),
            Command::Stop { reason, reply } => {
                self.stop.get_or_insert((reason, None));
                self.stop_waiters.push(reply);
            }
            // A poke for an earlier activation's deadline is stale.
            Command::Deadline { epoch } if epoch == self.epoch => self.reported_deadline = None,
            Command::Deadline { .. } => {}
        }
    }

    /// Starts the next queued turn, if any. The log append of the request
    /// overlaps with forwarding it; the caller gets the response head only
    /// once the append is durable.
    async fn start_turn(
        &mut self,
        sandbox: &Arc<Sandbox>,
    ) -> Option<BoxFuture<'static, TurnOutcome>> {
        let (mut inv, reply) = self.pending.pop_front()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.add_token(&mut inv.request);
        let status_ev = self.set_status(SessionStatus::Active);
        let received = SessionEvent::InvocationReceived {
            request_id: inv.request_id.clone(),
            bytes_in: inv.bytes_in,
        };
        let log = self.shared.log.clone();
        let (id, epoch) = (self.id.clone(), self.epoch);
        let sandbox = sandbox.clone();
        Some(
            async move {
                let started = Instant::now();
                let request_id = inv.request_id.clone();
                let logged = append_all(&*log, &id, epoch, [Some(received), status_ev]);
                let (logged, resp) = tokio::join!(logged, sandbox.request(inv.request));
                run_turn(logged, resp, reply, request_id, started).await
            }
            .boxed(),
        )
    }

    /// Moves the status clock, keeping the quota flag in step; returns the
    /// event to log if the status changed.
    fn set_status(&mut self, to: SessionStatus) -> Option<SessionEvent> {
        let ev = self.clock.set(to);
        self.busy
            .store(self.clock.status != SessionStatus::Idle, Ordering::Release);
        ev
    }

    /// Puts this activation's workload token on the request; the caller
    /// cannot supply one of its own.
    fn add_token(&self, req: &mut http::Request<BoxBody>) {
        req.headers_mut().remove(WORKLOAD_TOKEN_HEADER);
        let Some(tokens) = &self.shared.cfg.tokens else {
            return;
        };
        let token = tokens.mint(
            &self.tenant,
            &self.user,
            &self.agent.name,
            &self.id,
            self.epoch,
        );
        if let Some(v) = token.and_then(|t| http::HeaderValue::from_str(&t).ok()) {
            req.headers_mut().insert(WORKLOAD_TOKEN_HEADER, v);
        }
    }

    async fn end_turn(&mut self, o: TurnOutcome) {
        let completed = SessionEvent::InvocationCompleted {
            request_id: o.request_id,
            status: o.status,
            bytes_out: o.stats.bytes_out,
            duration_ms: o.started.elapsed().as_secs_f64() * 1e3,
        };
        self.clock.last_activity = Instant::now();
        let idle = if self.pending.is_empty() && !self.agent_busy {
            self.set_status(SessionStatus::Idle)
        } else {
            None
        };
        // The next turn need not wait for this commit: hand the events to
        // the writer now (the first poll sends them, which fixes their
        // order before the next turn's events) and let the serve loop
        // finish the wait.
        let (log, id, epoch) = (self.shared.log.clone(), self.id.clone(), self.epoch);
        let mut tail: BoxFuture<'static, ()> = async move {
            if let Err(e) = append_all(&*log, &id, epoch, [Some(completed), idle]).await {
                tracing::error!(error = %e, "session log append failed");
            }
        }
        .boxed();
        if futures_util::poll!(&mut tail).is_pending() {
            self.log_tail.push_back(tail);
        }
    }

    async fn on_health(&mut self, h: Health, in_turn: bool) {
        match h {
            Health::Failed(detail) => {
                self.ping_failures += 1;
                if self.ping_failures >= self.shared.cfg.ping_failures {
                    self.stop = Some((TerminationReason::Unhealthy, Some(detail)));
                }
            }
            Health::Healthy { busy, last_update } => {
                self.ping_failures = 0;
                self.agent_busy = busy;
                if last_update.is_some() && last_update != self.agent_last_update {
                    // Only a status that changed restarts the idle clock.
                    if self.agent_last_update.is_some() {
                        self.clock.last_activity = Instant::now();
                    }
                    self.agent_last_update = last_update;
                }
                let to = if busy || in_turn {
                    SessionStatus::Active
                } else {
                    SessionStatus::Idle
                };
                if busy {
                    self.clock.last_activity = Instant::now();
                }
                if let Some(ev) = self.set_status(to) {
                    self.append(ev).await;
                }
            }
        }
    }

    /// Ends the activation when a deadline has passed, else tells the
    /// expiry task when to look again.
    fn check_deadlines(&mut self, in_turn: bool) {
        let life = &self.agent.manifest.lifecycle;
        let lifetime_end = self.clock.started + Duration::from_secs(life.max_lifetime_s);
        let idle_end = self.clock.last_activity + Duration::from_secs(life.idle_timeout_s);
        let idle_applies = !in_turn && self.pending.is_empty() && !self.agent_busy;
        let now = Instant::now();
        if now >= lifetime_end {
            self.stop = Some((TerminationReason::MaxLifetime, None));
            return;
        }
        if idle_applies && now >= idle_end {
            self.stop = Some((TerminationReason::IdleTimeout, None));
            return;
        }
        let next = if idle_applies {
            lifetime_end.min(idle_end)
        } else {
            lifetime_end
        };
        if self.reported_deadline != Some(next) {
            self.reported_deadline = Some(next);
            self.shared
                .expiry
                .schedule(&self.id, self.epoch, next, self.tx.clone());
        }
    }

    /// Tears the activation down and records why and what it used.
    async fn finish(mut self, sandbox: Option<Arc<Sandbox>>, start_error: Option<SessionError>) {
        let (reason, detail) = self
            .stop
            .take()
            .unwrap_or((TerminationReason::Shutdown, None));
        self.shared.expiry.cancel(&self.id, self.epoch);
        while self.log_tail.next().await.is_some() {}
        // Closing first makes new submissions bounce (`Submit::Gone`); the
        // manager then waits for `done` before it activates again, so this
        // activation's last events are written under its own epoch.
        self.rx.close();
        self.reject_waiting(reason, start_error);
        let mut usage = UsageSample::default();
        if let Some(sb) = sandbox {
            match Arc::try_unwrap(sb) {
                Ok(sb) => match sb.terminate(self.shared.cfg.stop_grace).await {
                    Ok(u) => {
                        usage.cpu_seconds = u.cpu_seconds;
                        usage.peak_memory_bytes = u.peak_memory_bytes;
                    }
                    Err(e) => tracing::error!(error = %e, "sandbox teardown failed"),
                },
                Err(_) => tracing::error!("sandbox still shared at teardown"),
            }
        }
        self.clock.account(Instant::now());
        usage.active_seconds = self.clock.active.as_secs_f64();
        usage.idle_seconds = self.clock.idle.as_secs_f64();
        self.append(SessionEvent::Usage(usage)).await;
        self.append(SessionEvent::Terminated { reason, detail })
            .await;
        tracing::info!(reason = reason.as_str(), "session terminated");
        self.shared.registry.remove(&self.id, self.epoch);
        let _ = self.done_tx.send(true);
        for w in self.stop_waiters.drain(..) {
            let _ = w.send(());
        }
    }

    /// Answers every turn that will not run. Turns queued behind a stop by
    /// a caller fail; turns that merely raced an expiry go to a fresh
    /// activation.
    fn reject_waiting(&mut self, reason: TerminationReason, start_error: Option<SessionError>) {
        let retry = !matches!(
            reason,
            TerminationReason::Stopped
                | TerminationReason::Shutdown
                | TerminationReason::StartFailed
        );
        let mut waiting: Vec<(Box<Invocation>, Reply)> = self.pending.drain(..).collect();
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Invoke { inv, reply } => waiting.push((inv, reply)),
                Command::Stop { reply, .. } => self.stop_waiters.push(reply),
                Command::Deadline { .. } => {}
            }
        }
        let mut start_error = start_error;
        for (inv, reply) in waiting {
            let r = if retry {
                Reject::Retry(inv)
            } else if let Some(e) = start_error.take() {
                Reject::Error(e)
            } else if reason == TerminationReason::StartFailed {
                Reject::Error(SessionError::StartFailed("see the session log".into()))
            } else {
                Reject::Error(SessionError::Terminated(reason.as_str()))
            };
            let _ = reply.send(Err(r));
        }
    }
}

/// Appends events in order. All are handed to the log's writer before the
/// first is awaited, so they share one group commit.
async fn append_all<const N: usize>(
    log: &dyn berth_log::SessionLog,
    id: &SessionId,
    epoch: u64,
    events: [Option<SessionEvent>; N],
) -> Result<(), berth_log::LogError> {
    let appends = events
        .into_iter()
        .flatten()
        .map(|ev| log.append(id, epoch, ev));
    for r in futures_util::future::join_all(appends).await {
        r?;
    }
    Ok(())
}

/// Forwards the response to the caller once the request is in the log, then
/// waits for its body to end.
async fn run_turn(
    logged: Result<(), berth_log::LogError>,
    resp: Result<http::Response<hyper::body::Incoming>, berth_sandbox::DriverError>,
    reply: Reply,
    request_id: RequestId,
    started: Instant,
) -> TurnOutcome {
    let failed = |status| TurnOutcome {
        request_id: request_id.clone(),
        status,
        stats: TurnStats {
            bytes_out: 0,
            complete: false,
        },
        started,
    };
    if let Err(e) = logged {
        let _ = reply.send(Err(Reject::Error(e.into())));
        return failed(500);
    }
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let _ = reply.send(Err(Reject::Error(SessionError::AgentUnreachable(
                e.to_string(),
            ))));
            return failed(424);
        }
    };
    if resp.headers().contains_key(GUEST_ERROR_HEADER) {
        let detail = guest_error(resp).await;
        let _ = reply.send(Err(Reject::Error(SessionError::AgentUnreachable(detail))));
        return failed(424);
    }
    let status = resp.status().as_u16();
    let (done_tx, done_rx) = oneshot::channel();
    let resp = resp.map(|b| TurnBody::new(b, done_tx));
    if reply.send(Ok(resp)).is_err() {
        return failed(499);
    }
    let stats = done_rx.await.unwrap_or(TurnStats {
        bytes_out: 0,
        complete: false,
    });
    TurnOutcome {
        request_id,
        status,
        stats,
        started,
    }
}

/// The header carrying the activation's workload token (CONTRACTS.md §1).
const WORKLOAD_TOKEN_HEADER: &str = "workloadaccesstoken";

/// Set by the guest on its own answers (the agent cannot set it: the guest
/// strips it from the agent's responses).
const GUEST_ERROR_HEADER: &str = "x-berth-guest-error";

/// The message of a guest's error answer, read within a small limit.
async fn guest_error(resp: http::Response<hyper::body::Incoming>) -> String {
    let limited = http_body_util::Limited::new(resp.into_body(), 64 * 1024);
    let bytes = limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "the agent could not be reached".into())
}

fn empty_body() -> BoxBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

async fn ping(sandbox: &Sandbox) -> Health {
    let req = match http::Request::get("/ping").body(empty_body()) {
        Ok(r) => r,
        Err(e) => return Health::Failed(e.to_string()),
    };
    let resp = match sandbox.request(req).await {
        Ok(r) => r,
        Err(e) => return Health::Failed(e.to_string()),
    };
    if !resp.status().is_success() {
        return Health::Failed(format!("/ping answered {}", resp.status()));
    }
    // The agent is untrusted: read at most 64 KiB of its ping answer.
    let limited = http_body_util::Limited::new(resp.into_body(), 64 * 1024);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Health::Failed(format!("/ping body: {e}")),
    };
    parse_ping(&bytes)
}

fn parse_ping(bytes: &[u8]) -> Health {
    #[derive(serde::Deserialize)]
    struct Ping {
        status: String,
        time_of_last_update: Option<f64>,
    }
    match serde_json::from_slice::<Ping>(bytes) {
        Ok(p) if p.status == "Healthy" || p.status == "HealthyBusy" => Health::Healthy {
            busy: p.status == "HealthyBusy",
            last_update: p.time_of_last_update.map(|t| t as i64),
        },
        Ok(p) => Health::Failed(format!("/ping status {:?}", p.status)),
        Err(e) => Health::Failed(format!("/ping answer is not valid: {e}")),
    }
}

fn ping_future(sandbox: Arc<Sandbox>, timeout: Duration) -> BoxFuture<'static, Health> {
    async move {
        match tokio::time::timeout(timeout, ping(&sandbox)).await {
            Ok(h) => h,
            Err(_) => Health::Failed("/ping timed out".into()),
        }
    }
    .boxed()
}

/// Polls `/ping` with a short backoff until healthy, the agent exits, or
/// `deadline` passes.
async fn wait_healthy(sandbox: &Sandbox, deadline: Instant) -> Result<(), String> {
    let mut delay = Duration::from_millis(2);
    let mut exited = sandbox.exited();
    let mut last = String::from("no answer yet");
    loop {
        if *exited.borrow_and_update() {
            return Err(format!(
                "the agent exited before it became healthy ({last})"
            ));
        }
        match ping(sandbox).await {
            Health::Healthy { .. } => return Ok(()),
            Health::Failed(why) => last = why,
        }
        if Instant::now() + delay > deadline {
            return Err(format!(
                "the agent did not become healthy within its start timeout ({last})"
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = exited.changed() => {}
        }
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// The sandbox of a session of `agent`. Everything but the id and the
/// session is the same for every session of a version, so a substrate may
/// start it as a clone of a template (see `Driver::prepare`).
pub(crate) fn sandbox_spec(
    cfg: &SessionConfig,
    agent: &AgentSpec,
    session: &SessionId,
) -> SandboxSpec {
    let m = &agent.manifest;
    let mut env: Vec<(String, String)> = vec![
        ("DOCKER_CONTAINER".into(), "1".into()),
        ("AWS_REGION".into(), cfg.aws_region.clone()),
        ("AWS_DEFAULT_REGION".into(), cfg.aws_region.clone()),
    ];
    env.extend(m.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    SandboxSpec {
        sandbox_id: format!("sb-{}", uuid::Uuid::new_v4().simple()),
        app_dir: agent.app_dir.clone(),
        venv_dir: agent.venv_dir.clone(),
        entrypoint: m.entrypoint.clone(),
        env,
        limits: Limits {
            vcpus: m.resources.vcpus,
            memory_bytes: m.resources.memory_mb * 1024 * 1024,
            pids: m.resources.pids,
        },
        agent_port: 8080,
        session_id: session.to_string(),
        snapshot: m.snapshot,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_answers() {
        assert!(matches!(
            parse_ping(br#"{"status":"Healthy","time_of_last_update":5}"#),
            Health::Healthy {
                busy: false,
                last_update: Some(5)
            }
        ));
        assert!(matches!(
            parse_ping(br#"{"status":"HealthyBusy"}"#),
            Health::Healthy { busy: true, .. }
        ));
        assert!(matches!(
            parse_ping(br#"{"status":"Sick"}"#),
            Health::Failed(_)
        ));
        assert!(matches!(parse_ping(b"not json"), Health::Failed(_)));
    }

    #[test]
    fn clock_accounts_by_status() {
        let mut c = Clock::new();
        assert!(c.set(SessionStatus::Idle).is_some());
        assert!(c.set(SessionStatus::Idle).is_none());
        assert!(c.set(SessionStatus::Active).is_some());
        assert!(c.set(SessionStatus::Provisioning).is_none());
    }
}
