//! The microvm substrate with real QEMU, the real guest kernel and real
//! python agents. Needs root, cgroup v1, qemu-system-x86_64 and the kernel
//! from `scripts/build-kernel /var/cache/berth-ci/kernel` (or
//! BERTH_TEST_KERNEL).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use berth_sandbox::microvm::{Accel, MicrovmConfig, MicrovmDriver};
use berth_sandbox::process::{CGROUP_ROOT, CONTROLLERS};
use berth_sandbox::{Driver, Sandbox};
use common::*;
use http_body_util::BodyExt;

static N: AtomicU32 = AtomicU32::new(0);

fn kernel() -> PathBuf {
    let path = std::env::var("BERTH_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/cache/berth-ci/kernel/vmlinux"));
    assert!(
        path.is_file(),
        "guest kernel {path:?} missing: build it with `scripts/build-kernel /var/cache/berth-ci/kernel` \
         (or point BERTH_TEST_KERNEL at one)"
    );
    path
}

struct VmEnv {
    driver: MicrovmDriver,
    cfg: MicrovmConfig,
    _state: tempfile::TempDir,
}

impl Drop for VmEnv {
    fn drop(&mut self) {
        for c in CONTROLLERS {
            let _ = std::fs::remove_dir(Path::new(CGROUP_ROOT).join(c).join(&self.cfg.cgroup_name));
        }
    }
}

/// A microVM driver with its own state dir, cgroup parent and uid range;
/// images are cached across tests in one shared store.
fn vm_env(accel: Accel) -> VmEnv {
    require_host();
    let n = N.fetch_add(1, Ordering::SeqCst);
    let state = tempfile::Builder::new()
        .prefix("berth-vm-state")
        .tempdir()
        .unwrap();
    let cfg = microvm_config(state.path(), n, accel);
    let driver = MicrovmDriver::new(cfg.clone()).unwrap();
    VmEnv {
        driver,
        cfg,
        _state: state,
    }
}

fn microvm_config(state: &Path, n: u32, accel: Accel) -> MicrovmConfig {
    let mut cfg = MicrovmConfig::new(state, guest_binary(), kernel());
    cfg.images_dir = Some(PathBuf::from("/var/tmp/berth-test-vm-images"));
    cfg.cgroup_name = format!("berth-vm-test-{}-{n}", std::process::id());
    cfg.uid_base = 500_000 + n * 100 + (std::process::id() % 1000) * 10_000;
    cfg.uid_count = 100;
    cfg.accel = accel;
    cfg
}

async fn start(env: &VmEnv, app: &Path, snapshot: bool) -> Sandbox {
    let mut sp = spec("vm", app);
    sp.snapshot = snapshot;
    env.driver.start(sp).await.unwrap()
}

#[tokio::test]
async fn round_trip_and_streaming() {
    init_tracing();
    let env = vm_env(Accel::Tcg);
    let app = app(AGENT);
    let t = Instant::now();
    let sb = start(&env, app.path(), true).await;
    eprintln!("first start (template build + clone): {:?}", t.elapsed());
    let (status, body) = call(&sb, "POST", "/invocations", r#"{"prompt":"hi"}"#).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["echo"], r#"{"prompt":"hi"}"#);
    // SSE arrives chunk by chunk, not at the end.
    let req = http::Request::get("/stream").body(body_of("")).unwrap();
    let resp = sb.request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if frame.unwrap().data_ref().is_some() {
            arrivals.push(Instant::now());
        }
    }
    assert!(arrivals.len() >= 5, "{} chunks", arrivals.len());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread > Duration::from_millis(900),
        "chunks bunched: {spread:?}"
    );
    let status = sb.guest_status().await.unwrap();
    assert!(status.running);
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

/// Like `wait_healthy`, with room for a TCG boot on a shared machine.
async fn wait_vm_healthy(sb: &Sandbox) {
    let start = Instant::now();
    loop {
        let req = http::Request::get("/ping").body(body_of("")).unwrap();
        if let Ok(resp) = sb.request(req).await {
            if resp.status() == 200 {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "agent never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn body_of(s: &str) -> berth_sandbox::BoxBody {
    body(s.to_string())
}

const PROBE: &str = "import os, time, uuid\nt = time.monotonic()\ntime.sleep(0.2)\nresult = {'rand': os.urandom(16).hex(), 'uuid': str(uuid.uuid4()), 'now': time.time(), 'slept': time.monotonic() - t, 'session': open('/run/berth/session_id').read()}";

/// Two clones of one template: different kernel randomness, the host's
/// clock, their own session id, and working timers.
#[tokio::test]
async fn clones_get_fresh_entropy_clock_and_identity() {
    init_tracing();
    let env = vm_env(Accel::Tcg);
    let app = app(AGENT);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut sp = spec("vm", app.path());
        let session = sp.session_id.clone();
        sp.snapshot = true;
        let sb = env.driver.start(sp).await.unwrap();
        let before = unix_now();
        let v = tokio::time::timeout(Duration::from_secs(20), run_py(&sb, PROBE))
            .await
            .expect("agent answers after the restore");
        let after = unix_now();
        // The template was snapshotted long before: without the hello's
        // clock the guest would be behind by the whole build.
        let now = v["now"].as_f64().unwrap();
        assert!(
            now > before - 1.0 && now < after + 1.0,
            "guest clock {now} outside the host's [{before}, {after}]"
        );
        let slept = v["slept"].as_f64().unwrap();
        assert!((0.19..2.0).contains(&slept), "sleep(0.2) took {slept}");
        assert_eq!(v["session"], session.as_str());
        seen.push(v);
        sb.terminate(Duration::from_secs(1)).await.unwrap();
    }
    assert_ne!(
        seen[0]["rand"], seen[1]["rand"],
        "clones share kernel RNG state"
    );
    assert_ne!(seen[0]["uuid"], seen[1]["uuid"]);
}

fn cgroup_dirs(env: &VmEnv, id: &str) -> Vec<PathBuf> {
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

fn assert_gone(env: &VmEnv, id: &str, pids: &[u32]) {
    for pid in pids {
        let alive = proc_status(*pid).is_some_and(|s| !s["State"].starts_with('Z'));
        assert!(!alive, "qemu pid {pid} survived");
    }
    for dir in cgroup_dirs(env, id) {
        assert!(!dir.exists(), "cgroup {dir:?} left behind");
    }
    let dir = env.cfg.state_dir.join("vms").join(id);
    assert!(!dir.exists(), "vm dir {dir:?} left behind");
}

/// A fresh boot (snapshot = false), its usage, and a terminate that
/// leaves no process, cgroup or file; QEMU runs as its own uid.
#[tokio::test]
async fn fresh_boot_and_terminate_removes_everything() {
    init_tracing();
    let env = vm_env(Accel::Tcg);
    let app = app(AGENT);
    let mut sp = spec("vm", app.path());
    sp.snapshot = false;
    let id = sp.sandbox_id.clone();
    let sb = env.driver.start(sp).await.unwrap();
    wait_vm_healthy(&sb).await;
    assert_eq!(run_py(&sb, "result = 6 * 7").await, 42);
    let pids = sb.host_pids();
    assert_eq!(pids.len(), 1, "one QEMU per sandbox: {pids:?}");
    let st = proc_status(pids[0]).unwrap();
    let uid: u32 = st["Uid"]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(uid >= env.cfg.uid_base, "QEMU runs as uid {uid}");
    assert_eq!(st["Seccomp"], "2", "QEMU's -sandbox filter is on");
    assert!(cgroup_dirs(&env, &id).iter().all(|d| d.exists()));
    let usage = sb.terminate(Duration::from_secs(2)).await.unwrap();
    assert!(
        usage.cpu_seconds > 0.0 && usage.peak_memory_bytes > 0,
        "{usage:?}"
    );
    assert_gone(&env, &id, &pids);
}

/// The agent's exit ends the VM, with the agent's exit code.
#[tokio::test]
async fn agent_exit_ends_the_sandbox() {
    init_tracing();
    let env = vm_env(Accel::Tcg);
    let app = app("import sys, time\ntime.sleep(1)\nsys.exit(7)\n");
    let mut sp = spec("vm", app.path());
    sp.snapshot = false;
    let sb = env.driver.start(sp).await.unwrap();
    let mut exited = sb.exited();
    tokio::time::timeout(Duration::from_secs(60), exited.wait_for(|e| *e))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sb.guest_status().await.unwrap().exit_code, Some(7));
    sb.terminate(Duration::from_millis(100)).await.unwrap();
}

/// A driver forgotten without teardown (a crash): the next one's sweep
/// kills its QEMU and removes its cgroups and directories.
#[tokio::test]
async fn sweep_cleans_up_after_a_crash() {
    init_tracing();
    let env = vm_env(Accel::Tcg);
    let app = app(AGENT);
    let mut sp = spec("vm", app.path());
    sp.snapshot = false;
    let id = sp.sandbox_id.clone();
    let sb = env.driver.start(sp).await.unwrap();
    let pids = sb.host_pids();
    std::mem::forget(sb);
    let fresh = MicrovmDriver::new(env.cfg.clone()).unwrap();
    let report = fresh.sweep().await.unwrap();
    assert!(report.processes_killed >= 1, "{report:?}");
    assert_eq!(report.state_dirs_removed, 1, "{report:?}");
    assert_gone(&env, &id, &pids);
    assert_eq!(fresh.sweep().await.unwrap(), Default::default());
}

/// An agent allocating past the VM's RAM (in touched chunks: one huge
/// allocation is refused up front by the guest's overcommit check) is
/// OOM-killed inside the guest; QEMU stays within its cgroup and the host
/// is untouched.
#[tokio::test]
async fn memory_past_the_vm_is_oom_killed_inside() {
    init_tracing();
    let env = vm_env(Accel::Tcg);
    let app = app(AGENT);
    let mut sp = spec("vm", app.path());
    sp.snapshot = false;
    sp.limits.memory_bytes = 128 << 20;
    let sb = env.driver.start(sp).await.unwrap();
    wait_vm_healthy(&sb).await;
    let code = "import subprocess, sys\n\
        p = subprocess.run([sys.executable, '-c', 'c = [b\"x\" * (8 << 20) for _ in range(60)]'])\n\
        result = p.returncode";
    let rc = run_py(&sb, code).await;
    assert_eq!(
        rc, -9,
        "the allocation was killed by the guest's OOM killer"
    );
    assert!(
        sb.guest_status().await.unwrap().running,
        "the agent survived"
    );
    let usage = sb.terminate(Duration::from_secs(2)).await.unwrap();
    let cap = (128 + env.cfg.memory_overhead_mb) << 20;
    assert!(usage.peak_memory_bytes <= cap, "{usage:?}");
}

/// Auto runs the KVM probe once (bounded) and falls back to TCG here;
/// doctor's report says how VMs run.
#[tokio::test]
async fn auto_accel_probes_and_doctor_reports() {
    init_tracing();
    let env = vm_env(Accel::Auto);
    let t = Instant::now();
    let accel = env.driver.accel().await;
    assert!(t.elapsed() < env.cfg.probe_timeout + Duration::from_secs(2));
    assert!(matches!(accel, Accel::Kvm | Accel::Tcg));
    let report = berth_sandbox::microvm::probe(&env.cfg).await;
    assert!(report.available, "{report:?}");
    assert!(
        report.detail.contains("QEMU emulator version"),
        "{report:?}"
    );
    let app = app(AGENT);
    let mut sp = spec("vm", app.path());
    sp.snapshot = false;
    let sb = env.driver.start(sp).await.unwrap();
    wait_vm_healthy(&sb).await;
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}
