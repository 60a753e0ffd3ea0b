//! Crash and shutdown: acknowledged events survive kill -9 (T22, scaled),
//! a restart cleans up what the crash left, and a graceful stop stops
//! every sandbox.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Sandbox cgroups left under this server's cgroup in every controller.
fn leftover_cgroups(cgroup: &str) -> Vec<String> {
    let mut left = Vec::new();
    for ctl in ["memory", "pids", "cpu"] {
        let dir = Path::new("/sys/fs/cgroup").join(ctl).join(cgroup);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    left.push(e.path().display().to_string());
                }
            }
        }
    }
    left
}

async fn events_of(c: &reqwest::Client, s: &Server, key: &str, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let v: Value = c
            .get(format!("{}/v1/sessions/{id}/events?after={after}", s.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = v["events"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return out;
        }
        after = page.last().unwrap()["seq"].as_u64().unwrap();
        out.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stops_every_sandbox() {
    let mut s = Server::start();
    s.deploy_example("echo", None);
    let c = s.client();
    let ids: Vec<String> = (0..3).map(|i| sid(&format!("shut{i}"))).collect();
    for id in &ids {
        assert_eq!(
            invoke(&c, &s, &s.admin_key, "echo", id, json!({}))
                .await
                .status(),
            200
        );
    }
    assert!(
        !leftover_cgroups(&s.cgroup).is_empty(),
        "live sandboxes must have cgroups"
    );
    let status = s.terminate();
    assert!(status.success(), "berth exited with {status}");
    assert_eq!(leftover_cgroups(&s.cgroup), Vec::<String>::new());
    assert!(
        std::fs::read_dir(s.data.join("sandboxes"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
    s.boot();
    for id in &ids {
        let v: Value = get_json(&c, &s, &s.admin_key, &format!("/v1/sessions/{id}")).await;
        assert_eq!(v["status"], "terminated");
        assert_eq!(v["termination_reason"], "shutdown");
    }
}

/// T22, scaled for CI: 50 kill -9 cycles while clients invoke. Every
/// acknowledged invocation is in the log exactly once afterwards, and
/// berth serves again within 5 s of the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t22_kill_9_loses_no_acknowledged_event() {
    let mut s = Server::start();
    s.deploy_example("echo", None);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let clients = 8;
    let ids: Vec<String> = (0..clients).map(|i| sid(&format!("t22-{i}"))).collect();
    let mut acked: HashMap<String, Vec<String>> = HashMap::new();
    for cycle in 0..50u64 {
        let mut tasks = Vec::new();
        let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for id in ids.clone() {
            let (c, url, key) = (c.clone(), s.url.clone(), s.admin_key.clone());
            let acks = acks.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..200 {
                    let r = c
                        .post(format!("{url}/v1/agents/echo/invocations"))
                        .bearer_auth(&key)
                        .header(SESSION_HEADER, &id)
                        .body("{}")
                        .send()
                        .await;
                    let Ok(r) = r else { break };
                    if r.status() != 200 {
                        continue;
                    }
                    let Ok(v) = r.json::<Value>().await else {
                        break;
                    };
                    got.push(v["request_id"].as_str().unwrap_or_default().to_owned());
                    acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                (id, got)
            }));
        }
        // Once turns flow (sandboxes start slower on a loaded machine),
        // kill at a different point of each cycle.
        let started = Instant::now();
        while acks.load(std::sync::atomic::Ordering::Relaxed) < 4
            && started.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(20 + (cycle * 37) % 300)).await;
        s.kill9();
        for t in tasks {
            let (id, got) = t.await.unwrap();
            acked.entry(id).or_default().extend(got);
        }
        let t0 = Instant::now();
        s.boot();
        let ok = c.get(format!("{}/health", s.url)).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "restart took {:?}",
            t0.elapsed()
        );
    }
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(
        total > 100,
        "too few acknowledged invocations to mean anything: {total}"
    );
    for (id, reqs) in &acked {
        let evs = events_of(&c, &s, &s.admin_key, id).await;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for e in &evs {
            if e["event"]["type"] == "invocation_received" {
                *seen
                    .entry(e["event"]["request_id"].as_str().unwrap())
                    .or_default() += 1;
            }
        }
        for r in reqs {
            assert_eq!(
                seen.get(r.as_str()),
                Some(&1),
                "acknowledged request {r} of {id} lost or duplicated"
            );
        }
        let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        assert!(
            evs.iter().any(|e| e["event"]["reason"] == "recovered"),
            "a crash must be recorded on restart"
        );
    }
    // The last restart swept the sandboxes the last crash left behind,
    // except those of sessions activated since.
    let live: Value = get_json(&c, &s, &s.admin_key, "/v1/sessions?status=idle").await;
    assert!(
        leftover_cgroups(&s.cgroup).len() <= 3 * live["sessions"].as_array().map_or(0, Vec::len)
    );
}
