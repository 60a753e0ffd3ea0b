//! The conformance suite against SQLite, plus what only this backend has:
//! reopening a file, group commit counters, a full disk, and the catalog.

#![allow(clippy::unwrap_used)]

mod conformance;

use berth_log::{SessionLog, SqliteLog};
use conformance::Log;
use std::sync::Arc;
use tempfile::TempDir;

fn fresh() -> (TempDir, SqliteLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLog::open(&dir.path().join("berth.db")).unwrap();
    (dir, log)
}

macro_rules! conformance {
    ($($name:ident $(($($arg:expr),*))?;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_dir, log) = fresh();
            let log: Log = Arc::new(log);
            conformance::$name(log $(, $($arg),*)?).await;
        }
    )*};
}

conformance! {
    create_then_reactivate;
    ownership_is_enforced;
    stale_epoch_is_refused;
    unknown_sessions;
    appends_fold_into_the_session;
    unreadable_event_is_refused;
    concurrent_appends(50, 40);
    concurrent_appends_to_one_session;
    follower_never_skips(1000);
    list_sessions_filters;
    usage_aggregates;
}

use berth_core::{Role, SessionEvent, SessionId, TenantId, UserId};
use berth_log::{ApiKeyRecord, LogError, SqliteConfig};
use conformance::{agent, fresh_tenant, invocation, principal};

/// Acknowledged appends survive closing and reopening the file, and the
/// owner is read back from the log, not taken from the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_across_reopen() {
    let (dir, log) = fresh();
    let path = dir.path().join("berth.db");
    let owner = principal(&fresh_tenant(), "alice");
    let id = SessionId::generate();
    log.activate(&id, &agent("echo"), &owner).await.unwrap();
    for n in 0..100 {
        log.append(&id, 1, invocation(n)).await.unwrap();
    }
    drop(log);

    let log = SqliteLog::open(&path).unwrap();
    let events = log.events(&id, 0, 0).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=101).collect::<Vec<_>>()
    );
    assert_eq!(log.session(&id).await.unwrap().unwrap().invocations, 100);
    let intruder = principal(&fresh_tenant(), "alice");
    assert!(matches!(
        log.activate(&id, &agent("echo"), &intruder).await,
        Err(LogError::NotFound)
    ));
    let again = log.activate(&id, &agent("echo"), &owner).await.unwrap();
    assert_eq!((again.epoch, again.created), (2, false));
    assert!(matches!(
        log.append(&id, 1, invocation(0)).await,
        Err(LogError::StaleEpoch { .. })
    ));
    assert_eq!(log.append(&id, 2, invocation(0)).await.unwrap(), 102);
}

/// Concurrent appends share commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_batches_appends() {
    let (_dir, log) = fresh();
    conformance::concurrent_appends(Arc::new(log.clone()), 50, 40).await;
    let (commits, writes) = (log.commits(), log.writes());
    assert_eq!(writes, 50 * 41);
    assert!(commits < writes, "{commits} commits for {writes} writes");
    eprintln!("{writes} writes in {commits} commits");
}

/// A database that cannot grow (a full disk, for SQLite) fails the batch:
/// no append after the failure is acknowledged, the log closes, and every
/// append that was acknowledged is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_closes_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.db");
    let config = SqliteConfig {
        max_pages: Some(64),
        ..Default::default()
    };
    let log = SqliteLog::open_with(&path, &config).unwrap();
    let owner = principal(&fresh_tenant(), "alice");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (log, owner) = (log.clone(), owner.clone());
        tasks.push(tokio::spawn(async move { fill(&log, &owner).await }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.push(task.await.unwrap());
    }
    assert!(log.is_closed());
    assert!(
        log.commits() > 0,
        "some batches committed before the disk filled"
    );
    assert!(matches!(
        log.append(&acknowledged[0].0, 1, invocation(0)).await,
        Err(LogError::Closed)
    ));
    let other = SessionId::generate();
    assert!(matches!(
        log.activate(&other, &agent("echo"), &owner).await,
        Err(LogError::Closed)
    ));
    drop(log);

    let log = SqliteLog::open(&path).unwrap();
    for (id, last_ok) in acknowledged {
        let Some(last_ok) = last_ok else { continue };
        let seqs: Vec<u64> = log
            .events(&id, 0, 0)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(
            seqs,
            (1..=last_ok).collect::<Vec<_>>(),
            "exactly the acknowledged events"
        );
    }
}

/// Appends big events until one fails; after that every append must fail
/// too, ending in `Closed`. Returns the session and its last acknowledged seq.
async fn fill(log: &SqliteLog, owner: &berth_core::Principal) -> (SessionId, Option<u64>) {
    let id = SessionId::generate();
    let mut last_ok = match log.activate(&id, &agent("echo"), owner).await {
        Ok(_) => Some(1),
        Err(_) => None,
    };
    let big = SessionEvent::Terminated {
        reason: berth_core::TerminationReason::Exited,
        detail: Some("x".repeat(2000)),
    };
    let mut failed = last_ok.is_none();
    for _ in 0..10_000 {
        if failed {
            break;
        }
        match log.append(&id, 1, big.clone()).await {
            Ok(seq) => last_ok = Some(seq),
            Err(e) => {
                // The one whose batch hit the full disk sees the cause; the
                // rest were queued behind it and see Closed.
                assert!(matches!(e, LogError::Sqlite(_) | LogError::Closed), "{e:?}");
                failed = true
            }
        }
    }
    assert!(failed, "the database never filled up");
    for _ in 0..3 {
        let err = log.append(&id, 1, big.clone()).await.unwrap_err();
        assert!(matches!(err, LogError::Closed), "after a failure: {err:?}");
    }
    (id, last_ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_never_reused() {
    let (dir, log) = fresh();
    let echo = agent("echo");
    assert!(log.agent(&echo).await.unwrap().is_none());
    assert!(log.latest_version(&echo).await.unwrap().is_none());
    for v in 1..=3 {
        let rec = log
            .create_version(&echo, &format!("{{\"v\":{v}}}"), &format!("/d/{v}"))
            .await
            .unwrap();
        assert_eq!(
            (rec.version, rec.dir.as_str()),
            (v, format!("/d/{v}").as_str())
        );
    }
    let a = log.agent(&echo).await.unwrap().unwrap();
    assert_eq!((a.latest_version, a.versions), (Some(3), 3));
    assert_eq!(
        log.latest_version(&echo)
            .await
            .unwrap()
            .unwrap()
            .manifest_json,
        "{\"v\":3}"
    );

    // Deleting the newest moves DEFAULT back, but its number is gone for good.
    assert!(log.delete_version(&echo, 3).await.unwrap());
    assert!(!log.delete_version(&echo, 3).await.unwrap());
    assert!(log.version(&echo, 3).await.unwrap().is_none());
    assert_eq!(log.latest_version(&echo).await.unwrap().unwrap().version, 2);
    assert_eq!(
        log.create_version(&echo, "{}", "/d").await.unwrap().version,
        4
    );
    let listed: Vec<u64> = log
        .versions(&echo)
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(listed, vec![1, 2, 4]);

    // So is deleting the whole agent, across a reopen.
    assert!(log.delete_agent(&echo).await.unwrap());
    assert!(!log.delete_agent(&echo).await.unwrap());
    assert!(log.agent(&echo).await.unwrap().is_none());
    assert!(log.versions(&echo).await.unwrap().is_empty());
    drop(log);
    let log = SqliteLog::open(&dir.path().join("berth.db")).unwrap();
    assert_eq!(
        log.create_version(&echo, "{}", "/d").await.unwrap().version,
        5
    );
    log.create_version(&agent("chat"), "{}", "/c")
        .await
        .unwrap();
    let agents: Vec<(String, Option<u64>, u64)> = log
        .list_agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name.to_string(), a.latest_version, a.versions))
        .collect();
    assert_eq!(
        agents,
        vec![("chat".into(), Some(1), 1), ("echo".into(), Some(5), 1)]
    );
}

fn key(id: &str, hash: &str, tenant: &TenantId) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.into(),
        hash: hash.into(),
        tenant: tenant.clone(),
        user: UserId::parse("alice").unwrap(),
        roles: vec![Role::Admin],
        created_at_ms: 1,
        revoked: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys() {
    let (dir, log) = fresh();
    let (t1, t2) = (fresh_tenant(), fresh_tenant());
    log.insert_api_key(&key("k1", "h1", &t1)).await.unwrap();
    log.insert_api_key(&key("k2", "h2", &t2)).await.unwrap();
    for dup in [key("k1", "hx", &t1), key("kx", "h1", &t1)] {
        assert!(matches!(
            log.insert_api_key(&dup).await,
            Err(LogError::Conflict(_))
        ));
    }
    assert!(log.api_key_by_hash("nope").await.unwrap().is_none());
    // Twice: the second comes from the cache, which the revoke must clear.
    for _ in 0..2 {
        assert_eq!(
            log.api_key_by_hash("h1").await.unwrap().unwrap(),
            key("k1", "h1", &t1)
        );
    }
    assert!(log.revoke_api_key("k1").await.unwrap());
    assert!(!log.revoke_api_key("missing").await.unwrap());
    assert!(log.api_key_by_hash("h1").await.unwrap().unwrap().revoked);

    let of_t2: Vec<String> = log
        .list_api_keys(Some(&t2))
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(of_t2, vec!["k2".to_owned()]);
    assert_eq!(log.list_api_keys(None).await.unwrap().len(), 2);
    drop(log);
    let log = SqliteLog::open(&dir.path().join("berth.db")).unwrap();
    assert!(log.api_key_by_hash("h1").await.unwrap().unwrap().revoked);
    assert!(!log.api_key_by_hash("h2").await.unwrap().unwrap().revoked);
}
