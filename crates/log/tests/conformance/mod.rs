//! The `SessionLog` conformance suite. Every backend runs every function
//! here against a fresh log; each function uses its own tenant and fresh
//! session ids, so the suite also holds on a shared database.

#![allow(clippy::unwrap_used, dead_code)]

use berth_core::{
    AgentName, Principal, RequestId, Role, SessionEvent, SessionId, SessionStatus, TenantId,
    TerminationReason, UsageSample, UserId,
};
use berth_log::{LogError, SessionFilter, SessionLog, UsageFilter, UsageGroup};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

pub type Log = Arc<dyn SessionLog>;

/// A tenant name no other test uses.
pub fn fresh_tenant() -> TenantId {
    let id = SessionId::generate();
    TenantId::parse(&format!("t{}", &id.as_str()[8..])).unwrap()
}

pub fn principal(tenant: &TenantId, user: &str) -> Principal {
    Principal::authenticated(tenant.clone(), UserId::parse(user).unwrap(), vec![])
}

pub fn agent(name: &str) -> AgentName {
    AgentName::parse(name).unwrap()
}

pub fn invocation(n: usize) -> SessionEvent {
    SessionEvent::InvocationReceived {
        request_id: RequestId::parse(&format!("r{n}")).unwrap(),
        bytes_in: n as u64,
    }
}

fn status(from: SessionStatus, to: SessionStatus) -> SessionEvent {
    SessionEvent::StatusChanged { from, to }
}

fn usage(active: f64, cpu: f64, peak: u64) -> SessionEvent {
    SessionEvent::Usage(UsageSample {
        active_seconds: active,
        idle_seconds: 1.0,
        cpu_seconds: cpu,
        peak_memory_bytes: peak,
    })
}

pub async fn create_then_reactivate(log: Log) {
    let tenant = fresh_tenant();
    let owner = principal(&tenant, "alice");
    let id = SessionId::generate();
    let first = log.activate(&id, &agent("echo"), &owner).await.unwrap();
    assert!(first.created);
    assert_eq!(first.epoch, 1);
    let r = &first.record;
    assert_eq!((&r.id, &r.tenant, r.user.as_str()), (&id, &tenant, "alice"));
    assert_eq!(
        (r.status, r.epoch, r.activations, r.last_seq),
        (SessionStatus::Provisioning, 1, 1, 1)
    );
    let events = log.events(&id, 0, 0).await.unwrap();
    assert_eq!(events.len(), 1);
    let created = SessionEvent::Created {
        agent: agent("echo"),
        tenant: tenant.clone(),
        user: owner.user().clone(),
    };
    assert_eq!(
        (events[0].seq, events[0].epoch, &events[0].event),
        (1, 1, &created)
    );

    log.append(
        &id,
        1,
        SessionEvent::Terminated {
            reason: TerminationReason::IdleTimeout,
            detail: None,
        },
    )
    .await
    .unwrap();
    let second = log.activate(&id, &agent("echo"), &owner).await.unwrap();
    assert!(!second.created);
    assert_eq!(second.epoch, 2);
    let r = &second.record;
    assert_eq!(
        (r.status, r.epoch, r.activations, r.last_seq),
        (SessionStatus::Provisioning, 2, 2, 2)
    );
    assert_eq!(r.termination_reason, None, "a new activation has not ended");
    assert_eq!(log.session(&id).await.unwrap().unwrap().epoch, 2);
}

/// Someone else's session must look exactly like a missing one.
pub async fn ownership_is_enforced(log: Log) {
    let tenant = fresh_tenant();
    let owner = principal(&tenant, "alice");
    let id = SessionId::generate();
    log.activate(&id, &agent("echo"), &owner).await.unwrap();

    let other_tenant = principal(&fresh_tenant(), "alice");
    let other_user = principal(&tenant, "bob");
    let admin = Principal::authenticated(
        tenant.clone(),
        UserId::parse("root").unwrap(),
        vec![Role::Admin],
    );
    for intruder in [other_tenant, other_user, admin] {
        let err = log
            .activate(&id, &agent("echo"), &intruder)
            .await
            .unwrap_err();
        assert!(
            matches!(err, LogError::NotFound),
            "{intruder:?} got {err:?}"
        );
    }
    let err = log
        .activate(&id, &agent("other"), &owner)
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::Conflict(_)), "{err:?}");

    let record = log.session(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.epoch, record.activations, record.last_seq),
        (1, 1, 1),
        "refusals change nothing"
    );
    assert_eq!(record.user.as_str(), "alice");
    assert_eq!(
        log.activate(&id, &agent("echo"), &owner)
            .await
            .unwrap()
            .epoch,
        2
    );
}

pub async fn stale_epoch_is_refused(log: Log) {
    let owner = principal(&fresh_tenant(), "alice");
    let id = SessionId::generate();
    log.activate(&id, &agent("echo"), &owner).await.unwrap();
    assert_eq!(log.append(&id, 1, invocation(1)).await.unwrap(), 2);
    log.activate(&id, &agent("echo"), &owner).await.unwrap();

    for epoch in [1, 3, 0] {
        match log.append(&id, epoch, invocation(2)).await {
            Err(LogError::StaleEpoch { current: 2, got }) => assert_eq!(got, epoch),
            other => panic!("epoch {epoch}: {other:?}"),
        }
    }
    let record = log.session(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.last_seq, record.invocations),
        (2, 1),
        "nothing was appended"
    );
    assert_eq!(log.events(&id, 0, 0).await.unwrap().len(), 2);
    assert_eq!(log.append(&id, 2, invocation(3)).await.unwrap(), 3);
}

pub async fn unknown_sessions(log: Log) {
    let id = SessionId::generate();
    assert!(matches!(
        log.append(&id, 1, invocation(1)).await,
        Err(LogError::NotFound)
    ));
    assert!(log.session(&id).await.unwrap().is_none());
    assert!(log.events(&id, 0, 0).await.unwrap().is_empty());
}

/// Appends keep the session row in step, and events page by cursor.
pub async fn appends_fold_into_the_session(log: Log) {
    let owner = principal(&fresh_tenant(), "alice");
    let id = SessionId::generate();
    log.activate(&id, &agent("echo"), &owner).await.unwrap();
    let started = SessionEvent::SandboxStarted {
        agent_version: 7,
        substrate: "process".into(),
        epoch: 1,
        sandbox_ms: 3.5,
        agent_ms: 80.0,
    };
    let events = [
        started,
        status(SessionStatus::Provisioning, SessionStatus::Active),
        invocation(1),
        invocation(2),
        status(SessionStatus::Active, SessionStatus::Idle),
        SessionEvent::Terminated {
            reason: TerminationReason::Stopped,
            detail: Some("by admin".into()),
        },
        usage(2.0, 0.5, 1000),
    ];
    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            log.append(&id, 1, event.clone()).await.unwrap(),
            i as u64 + 2
        );
    }
    let r = log.session(&id).await.unwrap().unwrap();
    assert_eq!(r.status, SessionStatus::Terminated);
    assert_eq!(r.termination_reason, Some(TerminationReason::Stopped));
    assert_eq!(
        (r.agent_version, r.substrate.as_deref()),
        (Some(7), Some("process"))
    );
    assert_eq!((r.invocations, r.last_seq), (2, 8));
    assert_eq!(r.usage.cpu_seconds, 0.5);

    let all = log.events(&id, 0, 0).await.unwrap();
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    let stored: Vec<&SessionEvent> = all[1..].iter().map(|e| &e.event).collect();
    assert_eq!(stored, events.iter().collect::<Vec<_>>());
    let page = log.events(&id, 3, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert!(log.events(&id, 8, 0).await.unwrap().is_empty());

    // A new activation adds to the totals; peak memory is the maximum.
    log.activate(&id, &agent("echo"), &owner).await.unwrap();
    log.append(&id, 2, usage(3.0, 0.25, 500)).await.unwrap();
    let r = log.session(&id).await.unwrap().unwrap();
    assert_eq!(r.usage.active_seconds, 5.0);
    assert_eq!(r.usage.idle_seconds, 2.0);
    assert_eq!(r.usage.cpu_seconds, 0.75);
    assert_eq!(r.usage.peak_memory_bytes, 1000);
}

/// An event that could not be read back is refused, and nothing is stored.
pub async fn unreadable_event_is_refused(log: Log) {
    let owner = principal(&fresh_tenant(), "alice");
    let id = SessionId::generate();
    log.activate(&id, &agent("echo"), &owner).await.unwrap();
    let err = log
        .append(&id, 1, usage(f64::NAN, 0.0, 0))
        .await
        .unwrap_err();
    assert!(matches!(err, LogError::Corrupt(_)), "{err:?}");
    assert_eq!(log.session(&id).await.unwrap().unwrap().last_seq, 1);
    assert_eq!(log.append(&id, 1, invocation(1)).await.unwrap(), 2);
    assert_eq!(log.events(&id, 0, 0).await.unwrap().len(), 2);
}

/// Many sessions appending at once: every append acknowledged, present, in
/// order, without gaps.
pub async fn concurrent_appends(log: Log, sessions: usize, per_session: usize) {
    let owner = principal(&fresh_tenant(), "alice");
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (log, owner) = (log.clone(), owner.clone());
        tasks.push(tokio::spawn(async move {
            let id = SessionId::generate();
            log.activate(&id, &agent("echo"), &owner).await.unwrap();
            for n in 0..per_session {
                assert_eq!(
                    log.append(&id, 1, invocation(n)).await.unwrap(),
                    n as u64 + 2
                );
            }
            id
        }));
    }
    for task in tasks {
        let id = task.await.unwrap();
        let events = log.events(&id, 0, 0).await.unwrap();
        assert_eq!(events.len(), per_session + 1);
        for (i, e) in events.iter().enumerate().skip(1) {
            assert_eq!((e.seq, &e.event), (i as u64 + 1, &invocation(i - 1)));
        }
    }
}

/// Many tasks appending to one session at once get distinct seqs, no gaps.
pub async fn concurrent_appends_to_one_session(log: Log) {
    let owner = principal(&fresh_tenant(), "alice");
    let id = SessionId::generate();
    log.activate(&id, &agent("echo"), &owner).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..10 {
        let (log, id) = (log.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..20 {
                seqs.push(log.append(&id, 1, invocation(t * 100 + n)).await.unwrap());
            }
            seqs
        }));
    }
    let mut seqs = HashSet::new();
    for task in tasks {
        for seq in task.await.unwrap() {
            assert!(seqs.insert(seq), "seq {seq} handed out twice");
        }
    }
    assert_eq!(seqs, (2..=201).collect::<HashSet<u64>>());
    assert_eq!(log.session(&id).await.unwrap().unwrap().invocations, 200);
}

/// A follower that reads from its cursor after each wake-up sees every event
/// exactly once, in order, while another task appends.
pub async fn follower_never_skips(log: Log, count: usize) {
    let owner = principal(&fresh_tenant(), "alice");
    let id = SessionId::generate();
    let mut wake = log.subscribe();
    log.activate(&id, &agent("echo"), &owner).await.unwrap();
    let writer = {
        let (log, id) = (log.clone(), id.clone());
        tokio::spawn(async move {
            for n in 0..count {
                log.append(&id, 1, invocation(n)).await.unwrap();
            }
        })
    };
    let total = count as u64 + 1;
    let mut seen = Vec::new();
    let follow = async {
        let mut cursor = 0;
        while cursor < total {
            for e in log.events(&id, cursor, 100).await.unwrap() {
                seen.push(e.seq);
                cursor = e.seq;
            }
            if cursor < total {
                // Lagged only means wake-ups were dropped: re-read anyway.
                let _ = wake.recv().await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), follow)
        .await
        .expect("follower stalled");
    writer.await.unwrap();
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
}

pub async fn list_sessions_filters(log: Log) {
    let tenant = fresh_tenant();
    let (alice, bob) = (principal(&tenant, "alice"), principal(&tenant, "bob"));
    let mut ids = Vec::new();
    for (who, name) in [
        (&alice, "echo"),
        (&alice, "chat"),
        (&bob, "echo"),
        (&bob, "echo"),
    ] {
        let id = SessionId::generate();
        log.activate(&id, &agent(name), who).await.unwrap();
        ids.push(id);
        // Distinct creation times make "newest first" observable.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    log.append(
        &ids[3],
        1,
        SessionEvent::Terminated {
            reason: TerminationReason::Exited,
            detail: None,
        },
    )
    .await
    .unwrap();
    let list = |f: SessionFilter| {
        let log = log.clone();
        async move {
            log.list_sessions(&f)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    let t = Some(tenant.clone());
    let all = list(SessionFilter {
        tenant: t.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(
        all,
        vec![
            ids[3].clone(),
            ids[2].clone(),
            ids[1].clone(),
            ids[0].clone()
        ]
    );
    let of_bob = list(SessionFilter {
        tenant: t.clone(),
        user: Some(bob.user().clone()),
        ..Default::default()
    })
    .await;
    assert_eq!(of_bob, vec![ids[3].clone(), ids[2].clone()]);
    let chat = list(SessionFilter {
        tenant: t.clone(),
        agent: Some(agent("chat")),
        ..Default::default()
    })
    .await;
    assert_eq!(chat, vec![ids[1].clone()]);
    let ended = list(SessionFilter {
        tenant: t.clone(),
        status: Some(SessionStatus::Terminated),
        ..Default::default()
    })
    .await;
    assert_eq!(ended, vec![ids[3].clone()]);
    let two = list(SessionFilter {
        tenant: t.clone(),
        limit: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(two, vec![ids[3].clone(), ids[2].clone()]);
    let none = list(SessionFilter {
        tenant: Some(fresh_tenant()),
        ..Default::default()
    })
    .await;
    assert!(none.is_empty());

    let live: Vec<SessionId> = log
        .live_sessions()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.tenant == tenant)
        .map(|r| r.id)
        .collect();
    assert_eq!(live.len(), 3);
    assert!(!live.contains(&ids[3]), "terminated sessions are not live");
}

pub async fn usage_aggregates(log: Log) {
    let (t1, t2) = (fresh_tenant(), fresh_tenant());
    let plan = [
        (&t1, "alice", "echo", 1.0, 100),
        (&t1, "alice", "chat", 2.0, 300),
        (&t1, "bob", "echo", 4.0, 200),
        (&t2, "alice", "echo", 8.0, 50),
    ];
    let mut ids = Vec::new();
    for (tenant, user, name, active, peak) in plan {
        let id = SessionId::generate();
        log.activate(&id, &agent(name), &principal(tenant, user))
            .await
            .unwrap();
        log.append(&id, 1, invocation(1)).await.unwrap();
        log.append(&id, 1, usage(active, active / 2.0, peak))
            .await
            .unwrap();
        ids.push(id);
    }
    let rows = |group, filter: UsageFilter| {
        let log = log.clone();
        async move { log.usage(group, &filter).await.unwrap() }
    };
    let in_t1 = UsageFilter {
        tenant: Some(t1.clone()),
        ..Default::default()
    };

    let by_agent = rows(UsageGroup::Agent, in_t1.clone()).await;
    let summary: Vec<(&str, u64, f64, u64)> = by_agent
        .iter()
        .map(|r| {
            (
                r.key.as_str(),
                r.sessions,
                r.active_seconds,
                r.peak_memory_bytes,
            )
        })
        .collect();
    assert_eq!(summary, vec![("chat", 1, 2.0, 300), ("echo", 2, 5.0, 200)]);
    assert!(by_agent.iter().all(|r| r.tenant == t1.as_str()));

    let by_user = rows(UsageGroup::User, in_t1.clone()).await;
    let summary: Vec<(&str, u64, u64, f64)> = by_user
        .iter()
        .map(|r| (r.key.as_str(), r.sessions, r.invocations, r.cpu_seconds))
        .collect();
    assert_eq!(summary, vec![("alice", 2, 2, 1.5), ("bob", 1, 1, 2.0)]);

    let by_tenant = rows(
        UsageGroup::Tenant,
        UsageFilter {
            user: Some(UserId::parse("alice").unwrap()),
            agent: Some(agent("echo")),
            ..Default::default()
        },
    )
    .await;
    let mine: Vec<(String, f64)> = by_tenant
        .iter()
        .filter(|r| r.key == t1.as_str() || r.key == t2.as_str())
        .map(|r| (r.key.clone(), r.active_seconds))
        .collect();
    let mut expected = vec![(t1.to_string(), 1.0), (t2.to_string(), 8.0)];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(mine, expected);

    let one = rows(
        UsageGroup::Session,
        UsageFilter {
            session: Some(ids[2].clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(one.len(), 1);
    assert_eq!(
        (one[0].key.as_str(), one[0].idle_seconds, one[0].invocations),
        (ids[2].as_str(), 1.0, 1)
    );
}
