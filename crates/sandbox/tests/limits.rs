//! Resource limits: memory, pids, and usage accounting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_sandbox::{Driver, Limits};
use common::*;
use http::StatusCode;

#[tokio::test]
async fn memory_past_the_limit_kills_the_agent_not_the_host() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let mut sp = spec("oom", app.path());
    sp.limits = Limits {
        vcpus: 1.0,
        memory_bytes: 96 << 20,
        pids: 64,
    };
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let mut exited = sb.exited();
    let req = http::Request::post("/run")
        .body(body("result = len(b'x' * (400 << 20))"))
        .unwrap();
    // The agent dies mid-request: the relay fails or answers 502.
    if let Ok(resp) = sb.request(req).await {
        assert_ne!(
            resp.status(),
            StatusCode::OK,
            "400 MB allocated under a 96 MB limit"
        );
    }
    tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e))
        .await
        .expect("sandbox did not end within 5 s of the OOM")
        .unwrap();
    let status = sb.guest_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(
        status.signal,
        Some(9),
        "agent should be OOM-killed: {status:?}"
    );
    let usage = sb.terminate(Duration::from_millis(100)).await.unwrap();
    assert!(usage.peak_memory_bytes >= 90 << 20, "peak {usage:?}");
    assert!(
        usage.peak_memory_bytes <= 96 << 20,
        "peak over the limit: {usage:?}"
    );
}

#[tokio::test]
async fn fork_bomb_is_capped_by_pids_max() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let mut sp = spec("forkbomb", app.path());
    sp.limits.pids = 32;
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let code = r#"
import os, time
kids, errors = [], 0
for _ in range(200):
    try:
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
    except OSError:
        errors += 1
result = {"forked": len(kids), "errors": errors}
"#;
    let v = run_py(&sb, code).await;
    let forked = v["forked"].as_u64().unwrap();
    assert!(forked < 32, "forked {forked} processes under pids.max=32");
    assert!(v["errors"].as_u64().unwrap() > 0);
    assert!(sb.host_pids().len() <= 32);
    sb.terminate(Duration::from_millis(200)).await.unwrap();
}

#[tokio::test]
async fn usage_counts_cpu_and_peak_memory() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let sb = env.driver.start(spec("usage", app.path())).await.unwrap();
    wait_healthy(&sb).await;
    let code = r#"
import time
buf = b'y' * (50 << 20)
end = time.time() + 0.5
n = 0
while time.time() < end:
    n += 1
del buf
result = n
"#;
    run_py(&sb, code).await;
    let usage = sb.usage().await.unwrap();
    assert!(usage.cpu_seconds > 0.3, "{usage:?}");
    assert!(usage.peak_memory_bytes > 50 << 20, "{usage:?}");
    assert!(usage.memory_bytes > 0);
    let last = sb.terminate(Duration::from_secs(1)).await.unwrap();
    assert!(last.cpu_seconds >= usage.cpu_seconds);
}

#[tokio::test]
async fn cpu_quota_caps_spinning_threads() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let mut sp = spec("cpu", app.path());
    sp.limits.vcpus = 0.25;
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let before = sb.usage().await.unwrap().cpu_seconds;
    let code = r#"
import multiprocessing, time
def spin():
    end = time.time() + 1.0
    while time.time() < end:
        pass
ps = [multiprocessing.Process(target=spin) for _ in range(2)]
[p.start() for p in ps]
[p.join() for p in ps]
result = 1
"#;
    run_py(&sb, code).await;
    let used = sb.usage().await.unwrap().cpu_seconds - before;
    // Two spinners for 1 s would use 2 s; a quarter core allows ~0.25 s
    // (plus one scheduler period of slack).
    assert!(
        used < 0.6,
        "used {used} cpu seconds under a 0.25 vcpu quota"
    );
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}
