//! Usage accounting and the cpu quota on the process substrate (memory
//! and pids limits are in the conformance suite).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use berth_sandbox::Driver;
use common::*;

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
