//! Tenancy: quotas (T29), the user-id header, and ids that outlive their
//! sandbox (T4).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::Path;

fn live_sandboxes(cgroup: &str) -> usize {
    std::fs::read_dir(Path::new("/sys/fs/cgroup/pids").join(cgroup))
        .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

/// T29: a tenant over its session quota gets 402 and no sandbox beyond it;
/// over its rate, 429; other tenants are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t29_quotas_refuse_without_starting_sandboxes() {
    let s = Server::start_with(
        "[quotas]\ntenant_sessions = 3\nuser_invocations_per_second = 20\ntenant_creations_per_minute = 1000",
    );
    s.deploy_example("echo", None);
    let c = s.client();
    let greedy = s.create_key("greedy", "g", false);
    let calm = s.create_key("calm", "c", false);
    let mut statuses = Vec::new();
    for i in 0..30 {
        let r = invoke(
            &c,
            &s,
            &greedy,
            "echo",
            &sid(&format!("greedy{i}")),
            json!({}),
        )
        .await;
        let st = r.status().as_u16();
        if st == 402 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["code"], "quota_exceeded");
        }
        statuses.push(st);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    let refused = statuses.iter().filter(|s| **s == 402 || **s == 429).count();
    assert_eq!(refused, 27, "{statuses:?}");
    assert!(statuses.contains(&402), "{statuses:?}");
    assert_eq!(
        live_sandboxes(&s.cgroup),
        3,
        "no sandbox may start beyond the quota"
    );
    let list = get_json(&c, &s, &greedy, "/v1/sessions").await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 3);
    // Another tenant is unaffected.
    let r = invoke(&c, &s, &calm, "echo", &sid("calm"), json!({})).await;
    assert_eq!(r.status(), 200);
    // Invocation rate: 20/s per user; a burst of 60 on a live session is cut.
    let warm = sid("calm-warm");
    assert_eq!(
        invoke(&c, &s, &calm, "echo", &warm, json!({}))
            .await
            .status(),
        200
    );
    let mut limited = 0;
    for _ in 0..60 {
        let r = invoke(&c, &s, &calm, "echo", &warm, json!({})).await;
        if r.status() == 429 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["code"], "rate_limited");
            limited += 1;
        }
    }
    assert!(
        limited > 0,
        "60 quick invocations must exceed 20 per second"
    );
}

/// Idle sessions need not hold a slot when the config says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_can_be_left_out_of_the_count() {
    let s = Server::start_with("[quotas]\nuser_sessions = 1\nidle_sessions_count = false");
    s.deploy_example("echo", None);
    let c = s.client();
    let k = s.create_key("t", "u", false);
    for i in 0..3 {
        let r = invoke(&c, &s, &k, "echo", &sid(&format!("idle{i}")), json!({})).await;
        assert_eq!(r.status(), 200, "idle sessions must not hold the only slot");
    }
}

/// The user-id header is honoured only for a principal that may act for
/// users; the session then belongs to that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_header_needs_the_role() {
    let s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let plain = s.create_key("acme", "frontend", false);
    let front = s.create_key_with_roles("acme", "frontdoor", &["act-for-users"]);
    let alice = s.create_key("acme", "alice", false);
    let as_alice = |key: &str, id: &str| {
        c.post(format!("{}/v1/agents/echo/invocations", s.url))
            .bearer_auth(key)
            .header(SESSION_HEADER, id)
            .header("x-amzn-bedrock-agentcore-runtime-user-id", "alice")
            .body("{}")
            .send()
    };
    let id = sid("delegated");
    assert_eq!(as_alice(&plain, &id).await.unwrap().status(), 403);
    // The tenant admin may act for alice: the session is alice's.
    let r = as_alice(&s.admin_key, &id).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["headers"]["x-amzn-bedrock-agentcore-runtime-user-id"],
        "alice"
    );
    // A front end holding only the act-for-users role may do the same.
    let id2 = sid("delegated2");
    assert_eq!(as_alice(&front, &id2).await.unwrap().status(), 200);
    for sess in [&id, &id2] {
        let rec = get_json(&c, &s, &alice, &format!("/v1/sessions/{sess}")).await;
        assert_eq!(rec["user"], "alice");
    }
    let other = get_json(&c, &s, &plain, &format!("/v1/sessions/{id}")).await;
    assert_eq!(other["code"], "not_found");
}

/// T4: after a session is terminated (and after a restart), another user
/// cannot take its id: the owner comes from the durable log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_terminated_ids_stay_with_their_owner() {
    let mut s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let owner = s.create_key("a", "owner", false);
    let thief = s.create_key("a", "thief", false);
    let outsider = s.create_key("b", "x", false);
    let id = sid("t4");
    assert_eq!(
        invoke(&c, &s, &owner, "echo", &id, json!({}))
            .await
            .status(),
        200
    );
    let stop = c
        .delete(format!("{}/v1/sessions/{id}", s.url))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 200);
    for round in 0..2 {
        for k in [&thief, &outsider] {
            let r = invoke(&c, &s, k, "echo", &id, json!({})).await;
            assert_eq!(
                r.status(),
                404,
                "round {round}: a terminated id must not change hands"
            );
        }
        if round == 0 {
            s.terminate();
            s.boot();
        }
    }
    let r = invoke(&c, &s, &owner, "echo", &id, json!({})).await;
    assert_eq!(r.status(), 200);
    let rec = get_json(&c, &s, &owner, &format!("/v1/sessions/{id}")).await;
    assert_eq!(rec["user"], "owner");
    assert_eq!(
        rec["epoch"], 2,
        "the refused attempts must not have activated it"
    );
}

/// T2, scaled for CI: tenants x clients write unique canaries through their
/// own sessions over a shared, shrunk connection pool, with 10% of the
/// requests cancelled mid-flight; no response or stream frame ever carries
/// another client's canary. (The full 50 x 20 run: set BERTH_T2_TENANTS=50
/// and BERTH_T2_CLIENTS=20.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_no_canary_crosses_sessions() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (tenants, clients) = (env("BERTH_T2_TENANTS", 6), env("BERTH_T2_CLIENTS", 4));
    let s = Server::start_with("max_live_sessions = 1000\nqueue_depth = 64");
    s.deploy_example("echo", None);
    // One small pool for everyone forces connection reuse across tenants.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(2)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..tenants {
        for u in 0..clients {
            let key = s.create_key(&format!("t2-tenant-{t}"), &format!("user-{u}"), false);
            let (c, url) = (c.clone(), s.url.clone());
            tasks.push(tokio::spawn(async move {
                let me = format!("CANARY-{t}-{u}-");
                let id = sid(&format!("t2-{t}-{u}"));
                let mut seen_ok = 0;
                for n in 0..12 {
                    let canary = format!("{me}{n}");
                    let req = c
                        .post(format!("{url}/v1/agents/echo/invocations"))
                        .bearer_auth(&key)
                        .header(SESSION_HEADER, &id)
                        .json(&json!({"canary": canary, "sleep": if n % 10 == 3 { 0.5 } else { 0.0 }}))
                        .send();
                    // Every tenth request is abandoned mid-flight.
                    let r = if n % 10 == 3 {
                        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), req).await;
                        continue;
                    } else {
                        req.await.unwrap()
                    };
                    let body = r.text().await.unwrap();
                    for other in body.match_indices("CANARY-") {
                        assert!(body[other.0..].starts_with(&me), "foreign canary in {body}");
                    }
                    if body.contains(&canary) {
                        seen_ok += 1;
                    }
                }
                // The event stream of the session carries only this client's data.
                let mut stream = c
                    .get(format!("{url}/v1/sessions/{id}/events/stream?after=0"))
                    .bearer_auth(&key)
                    .send()
                    .await
                    .unwrap();
                let mut frames = String::new();
                while let Ok(Ok(Some(ch))) =
                    tokio::time::timeout(std::time::Duration::from_millis(300), stream.chunk()).await
                {
                    frames.push_str(&String::from_utf8_lossy(&ch));
                }
                assert!(frames.contains(&format!("\"session_id\":\"{id}\"")), "{frames}");
                for line in frames.lines().filter(|l| l.starts_with("data:")) {
                    assert!(line.contains(&id), "a frame of another session: {line}");
                }
                seen_ok
            }));
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert!(
        total >= tenants * clients * 9,
        "too few answered turns: {total}"
    );
}
