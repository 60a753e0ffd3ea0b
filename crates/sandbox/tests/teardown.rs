//! Teardown and crash sweep leave nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_sandbox::process::{mounts_under, ProcessDriver, CGROUP_ROOT, CONTROLLERS};
use berth_sandbox::Driver;
use common::*;

fn cgroup_dirs(env: &Env, id: &str) -> Vec<PathBuf> {
    CONTROLLERS
        .iter()
        .map(|c| {
            Path::new(CGROUP_ROOT)
                .join(c)
                .join(&env.cfg.cgroup_name)
                .join(id)
        })
        .collect()
}

fn assert_gone(env: &Env, id: &str, pids: &[u32]) {
    for pid in pids {
        // A zombie is dead; its reaper (the old driver's task) may lag.
        let alive = proc_status(*pid).is_some_and(|s| !s["State"].starts_with('Z'));
        assert!(!alive, "pid {pid} survived");
    }
    for dir in cgroup_dirs(env, id) {
        assert!(!dir.exists(), "cgroup {dir:?} left behind");
    }
    let state = env.cfg.state_dir.join(id);
    assert!(!state.exists(), "state dir {state:?} left behind");
    assert!(
        mounts_under(&env.cfg.state_dir).is_empty(),
        "mounts left under the state dir"
    );
}

#[tokio::test]
async fn dropped_sandbox_is_destroyed() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let sp = spec("drop", app.path());
    let id = sp.sandbox_id.clone();
    let sb = env.driver.start(sp).await.unwrap();
    let pids = sb.host_pids();
    drop(sb);
    for _ in 0..200 {
        if !env.cfg.state_dir.join(&id).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_gone(&env, &id, &pids);
}

#[tokio::test]
async fn sweep_cleans_up_after_a_crash() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let mut ids = Vec::new();
    let mut pids = Vec::new();
    for i in 0..2 {
        let sp = spec("crash", app.path());
        ids.push(sp.sandbox_id.clone());
        let sb = env.driver.start(sp).await.unwrap();
        wait_healthy(&sb).await;
        pids.extend(sb.host_pids());
        if i == 0 {
            // Kill the guest's setup parent: the sandbox lives on, orphaned.
            let me = std::process::id().to_string();
            let parent = sb
                .host_pids()
                .into_iter()
                .find(|p| proc_status(*p).is_some_and(|s| s["PPid"] == me));
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(parent.unwrap() as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
        // A crash: nothing runs the sandbox's destructor.
        std::mem::forget(sb);
    }
    let fresh = ProcessDriver::new(env.cfg.clone()).unwrap();
    let report = fresh.sweep().await.unwrap();
    assert!(report.processes_killed >= 4, "{report:?}");
    assert_eq!(report.state_dirs_removed, 2, "{report:?}");
    assert!(report.cgroups_removed >= 2 * 4, "{report:?}");
    for id in &ids {
        assert_gone(&env, id, &pids);
    }
    let again = fresh.sweep().await.unwrap();
    assert_eq!(again, Default::default());
}
