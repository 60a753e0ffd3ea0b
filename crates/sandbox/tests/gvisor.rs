//! The gVisor substrate with real runsc and a real python agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use berth_sandbox::Driver;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::json;

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn cgroup_dirs(cfg: &berth_sandbox::gvisor::GvisorConfig, id: &str) -> Vec<std::path::PathBuf> {
    berth_sandbox::process::CONTROLLERS
        .iter()
        .map(|c| {
            Path::new(berth_sandbox::process::CGROUP_ROOT)
                .join(c)
                .join(&cfg.cgroup_name)
                .join(id)
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    proc_status(pid).is_some_and(|s| !s["State"].starts_with('Z'))
}

#[tokio::test]
async fn round_trip_status_and_usage() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let sb = env.driver.start(spec("gv-echo", app.path())).await.unwrap();
    assert!(sb.start_time() < Duration::from_secs(5));
    wait_healthy(&sb).await;
    let (status, bytes) = call(&sb, "POST", "/invocations", r#"{"prompt":"hi"}"#).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["echo"], r#"{"prompt":"hi"}"#);
    let status = sb.guest_status().await.unwrap();
    assert!(status.running);
    let usage = sb.usage().await.unwrap();
    assert!(usage.cpu_seconds > 0.0, "{usage:?}");
    assert!(usage.memory_bytes > 1 << 20, "{usage:?}");
    assert!(usage.peak_memory_bytes >= usage.memory_bytes, "{usage:?}");
    let last = sb.terminate(Duration::from_secs(2)).await.unwrap();
    assert!(last.cpu_seconds >= usage.cpu_seconds);
}

#[tokio::test]
async fn sse_streams_chunk_by_chunk() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let sb = env.driver.start(spec("gv-sse", app.path())).await.unwrap();
    wait_healthy(&sb).await;
    let req = Request::get("/stream").body(body("")).unwrap();
    let resp = sb.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut events: Vec<(f64, f64)> = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        let received = now_secs();
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                let json: serde_json::Value =
                    serde_json::from_str(event.trim().trim_start_matches("data: ")).unwrap();
                events.push((json["t"].as_f64().unwrap(), received));
            }
        }
    }
    assert_eq!(events.len(), 5);
    // Each event arrives before the next one is even written (0.3 s apart).
    for pair in events.windows(2) {
        assert!(
            pair[0].1 < pair[1].0,
            "event received at {} only after the next was sent at {}: buffered",
            pair[0].1,
            pair[1].0
        );
    }
    sb.terminate(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn agent_exit_ends_the_sandbox_with_its_code() {
    init_tracing();
    let env = gvisor_env();
    let app = app("import sys, time\ntime.sleep(0.5)\nsys.exit(7)\n");
    let sb = env.driver.start(spec("gv-exit", app.path())).await.unwrap();
    let mut exited = sb.exited();
    tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e))
        .await
        .expect("sandbox did not end after the agent exited")
        .unwrap();
    let status = sb.guest_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.exit_code, Some(7));
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn terminate_removes_processes_cgroups_and_files() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let sp = spec("gv-term", app.path());
    let id = sp.sandbox_id.clone();
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let pids = sb.host_pids();
    // runsc, its gofer, its sentry and at least one ptrace stub.
    assert!(pids.len() >= 3, "{pids:?}");
    assert!(env.cfg.state_dir.join(&id).exists());
    let t = Instant::now();
    sb.terminate(Duration::from_secs(2)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived terminate");
    }
    for dir in cgroup_dirs(&env.cfg, &id) {
        assert!(!dir.exists(), "{dir:?} survived terminate");
    }
    assert!(!env.cfg.state_dir.join(&id).exists());
}

#[tokio::test]
async fn sweep_after_a_crashed_driver() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let sp = spec("gv-sweep", app.path());
    let id = sp.sandbox_id.clone();
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let pids = sb.host_pids();
    // A crash: nothing runs the sandbox's destructor.
    std::mem::forget(sb);
    let fresh = berth_sandbox::gvisor::GvisorDriver::new(env.cfg.clone()).unwrap();
    let report = fresh.sweep().await.unwrap();
    assert!(report.processes_killed >= pids.len(), "{report:?}");
    assert!(report.cgroups_removed >= 4, "{report:?}");
    assert_eq!(report.state_dirs_removed, 1, "{report:?}");
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived sweep");
    }
    for dir in cgroup_dirs(&env.cfg, &id) {
        assert!(!dir.exists(), "{dir:?} survived sweep");
    }
    assert_eq!(std::fs::read_dir(&env.cfg.state_dir).unwrap().count(), 0);
    let again = fresh.sweep().await.unwrap();
    assert_eq!(again.processes_killed, 0, "{again:?}");
}

#[tokio::test]
async fn memory_limit_ends_the_sandbox_not_the_host() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let mut sp = spec("gv-mem", app.path());
    sp.limits.memory_bytes = 160 << 20;
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    // Most of the limit is the agent's: runsc's own memory comes on top.
    let fits = "b = bytearray(120 << 20)\nresult = len(b) >> 20\n";
    assert_eq!(run_py(&sb, fits).await, 120);
    let hog = "blocks = []\nfor i in range(64):\n    blocks.append(bytearray(16 << 20))\nresult = len(blocks)\n";
    let req = Request::post("/run").body(body(hog)).unwrap();
    let answer = sb.request(req).await;
    let survived = match answer {
        Ok(resp) => {
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map(|b| b.to_bytes());
            format!("{status} {bytes:?}")
        }
        Err(e) => format!("{e}"),
    };
    let usage = sb.usage().await;
    let mut exited = sb.exited();
    // `is_ok` at once: the guard `wait_for` returns would block the
    // sandbox's own exit notice during terminate.
    let ended = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e))
        .await
        .is_ok();
    assert!(ended, "sandbox outlived its memory limit: {survived}");
    // v1 charges in per-cpu batches, so the peak may pass the limit by a
    // few pages, never by more.
    if let Ok(u) = usage {
        let limit = (160 << 20) + (env.cfg.runtime_memory_mb << 20);
        assert!(u.peak_memory_bytes <= limit + (1 << 20), "{u:?}");
    }
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn pids_limit_holds_inside() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let mut sp = spec("gv-pids", app.path());
    sp.limits.pids = 24;
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let bomb = r#"
import os, time
children, error = [], None
for i in range(200):
    try:
        pid = os.fork()
    except OSError as e:
        error = e.errno
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
result = {"forked": len(children), "errno": error}
"#;
    let v = run_py(&sb, bomb).await;
    assert!(v["forked"].as_u64().unwrap() < 24, "{v}");
    assert_eq!(v["errno"], 11, "{v}");
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

const INSIDE_VIEW: &str = r#"
import os, socket
def try_write(p):
    try:
        with open(p, "w") as f:
            f.write("x")
        return True
    except OSError:
        return False
def connect(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(addr)
        return True
    except OSError:
        return False
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
result = {
    "pid1": open("/proc/1/cmdline").read().split("\0")[:2],
    "canaries": [os.path.lexists(p) for p in CANARIES],
    "work": os.path.lexists("/work"), "root_home": os.path.lexists("/root"),
    "ifaces": [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]],
    "outside": connect(("1.1.1.1", 80)),
    "app_new": try_write("/app/new.txt"),
    "app_main_overwrite": try_write("/app/main.py"),
    "tmp": try_write("/tmp/x"),
    "root_write": try_write("/evil"),
    "usr_write": try_write("/usr/evil"),
    "etc_write": try_write("/etc/passwd"),
    "uid": os.getuid(),
    "spec_readable": os.access("/.berth/spec.json", os.R_OK),
    "cap_eff": status["CapEff"].strip(),
    "no_new_privs": libc.prctl(39, 0, 0, 0, 0),  # PR_GET_NO_NEW_PRIVS
    "seccomp": libc.prctl(21, 0, 0, 0, 0),  # PR_GET_SECCOMP: 2 = filter
    "status_keys": sorted(status),
    "hostname": socket.gethostname(),
    "kernel": os.uname().release,
}
"#;

#[tokio::test]
async fn escape_probes_from_inside() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let canaries = [
        format!("/tmp/berth-gv-canary-{}", std::process::id()),
        format!("/root/berth-gv-canary-{}", std::process::id()),
    ];
    for c in &canaries {
        std::fs::write(c, "host secret").unwrap();
    }
    let sb = env
        .driver
        .start(spec("gv-escape", app.path()))
        .await
        .unwrap();
    wait_healthy(&sb).await;
    let v = run_py(&sb, &format!("CANARIES = {canaries:?}\n{INSIDE_VIEW}")).await;
    for c in &canaries {
        std::fs::remove_file(c).unwrap();
    }
    assert_eq!(
        v["pid1"],
        json!(["/.berth/guest", "oci"]),
        "pid 1 is not the guest"
    );
    assert_eq!(v["canaries"], json!([false, false]), "host files visible");
    assert_eq!(v["work"], false);
    assert_eq!(v["root_home"], false);
    assert_eq!(v["ifaces"], json!(["lo"]));
    assert_eq!(v["outside"], false, "network reachable");
    assert_eq!(v["app_new"], true, "/app must be writable");
    assert_eq!(v["app_main_overwrite"], false, "version files are root's");
    assert_eq!(v["tmp"], true);
    assert_eq!(v["root_write"], false);
    assert_eq!(v["usr_write"], false);
    assert_eq!(v["etc_write"], false);
    assert_eq!(v["uid"], env.cfg.agent_uid);
    assert_eq!(
        v["spec_readable"], false,
        "the agent can read the guest's spec"
    );
    assert_eq!(v["cap_eff"], "0000000000000000");
    assert_eq!(v["no_new_privs"], 1, "{v}");
    assert_eq!(v["seccomp"], 2, "{v}");
    assert_eq!(v["hostname"], "berth");
    assert!(
        !app.path().join("new.txt").exists(),
        "a write inside reached the version's directory"
    );
    // The sentry answers uname, not the host kernel.
    let host = nix::sys::utsname::uname().unwrap();
    assert_ne!(v["kernel"], host.release().to_str().unwrap());
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

#[test]
fn probe_picks_the_first_working_platform_and_times_out_hangs() {
    let env = gvisor_env();
    let report = berth_sandbox::gvisor::probe(&env.cfg);
    assert!(report.available, "{report:?}");
    assert_eq!(report.substrate, "gvisor");
    assert!(report.detail.contains("ptrace"), "{report:?}");
    assert_eq!(env.driver.platform(), "ptrace");

    // kvm hangs on this kind of host (or fails fast elsewhere); either way
    // the probe moves on to ptrace within its timeout.
    let mut cfg = env.cfg.clone();
    cfg.platforms = vec!["kvm".into(), "ptrace".into()];
    cfg.probe_timeout = Duration::from_secs(2);
    let t = Instant::now();
    let driver = berth_sandbox::gvisor::GvisorDriver::new(cfg).unwrap();
    assert_eq!(driver.platform(), "ptrace");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    let mut cfg = env.cfg.clone();
    cfg.platforms = vec!["no-such-platform".into()];
    let err = berth_sandbox::gvisor::GvisorDriver::new(cfg).err().unwrap();
    assert!(
        matches!(err, berth_sandbox::DriverError::Unavailable { .. }),
        "{err}"
    );

    let mut cfg = env.cfg.clone();
    cfg.runsc = "/nonexistent/runsc".into();
    let report = berth_sandbox::gvisor::probe(&cfg);
    assert!(!report.available);
    assert!(
        report.detail.contains("apt-get install runsc"),
        "{report:?}"
    );
}

#[tokio::test]
async fn sweep_removes_empty_runsc_cgroups_and_keeps_busy_ones() {
    init_tracing();
    let env = gvisor_env();
    let root = Path::new(berth_sandbox::process::CGROUP_ROOT);
    let empty = format!("runsc-berth-test-{}", std::process::id());
    let busy = format!("runsc-berth-busy-{}", std::process::id());
    for c in ["memory", "pids"] {
        std::fs::create_dir_all(root.join(c).join(&empty).join("child")).unwrap();
    }
    std::fs::create_dir_all(root.join("pids").join(&busy)).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    std::fs::write(
        root.join("pids").join(&busy).join("cgroup.procs"),
        sleeper.id().to_string(),
    )
    .unwrap();
    let report = env.driver.sweep().await.unwrap();
    let busy_kept = root.join("pids").join(&busy).exists();
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let _ = std::fs::remove_dir(root.join("pids").join(&busy));
    for c in ["memory", "pids"] {
        assert!(!root.join(c).join(&empty).exists(), "{c}/{empty} kept");
    }
    assert!(busy_kept, "a runsc cgroup with a live process was removed");
    assert!(report.cgroups_removed >= 4, "{report:?}");
}

#[tokio::test]
async fn venv_is_mounted_read_only_and_on_path() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let venv = tempfile::tempdir().unwrap();
    std::fs::create_dir(venv.path().join("bin")).unwrap();
    std::fs::write(venv.path().join("bin").join("marker"), "venv").unwrap();
    let mut sp = spec("gv-venv", app.path());
    sp.venv_dir = Some(venv.path().to_path_buf());
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let code = r#"
import os
def try_write(p):
    try:
        open(p, "w").write("x")
        return True
    except OSError:
        return False
result = {
    "marker": open("/venv/bin/marker").read(),
    "path": os.environ["PATH"].split(":")[0],
    "write": try_write("/venv/bin/evil"),
}
"#;
    let v = run_py(&sb, code).await;
    assert_eq!(v["marker"], "venv");
    assert_eq!(v["path"], "/venv/bin");
    assert_eq!(v["write"], false);
    assert!(!venv.path().join("bin/evil").exists());
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test]
async fn guest_refuses_to_serve_with_capabilities_and_start_cleans_up() {
    init_tracing();
    let env = gvisor_env();
    // uid 0 inside keeps its capabilities after "dropping" to itself; the
    // guest must notice and refuse rather than run the agent privileged.
    let mut cfg = env.cfg.clone();
    cfg.agent_uid = 0;
    let driver = berth_sandbox::gvisor::GvisorDriver::new(cfg).unwrap();
    let app = app(AGENT);
    let sp = spec("gv-caps", app.path());
    let id = sp.sandbox_id.clone();
    let err = driver.start(sp).await.err().expect("started with uid 0");
    match err {
        berth_sandbox::DriverError::Setup { stage, .. } => assert_eq!(stage, "capabilities"),
        other => panic!("unexpected error {other}"),
    }
    for dir in cgroup_dirs(&env.cfg, &id) {
        assert!(!dir.exists(), "{dir:?} left after a failed start");
    }
    assert!(!env.cfg.state_dir.join(&id).exists());
}

#[tokio::test]
async fn every_runsc_process_is_under_the_limits_and_cpu_is_metered() {
    init_tracing();
    let env = gvisor_env();
    let app = app(AGENT);
    let mut sp = spec("gv-cpu", app.path());
    sp.limits.vcpus = 0.25;
    let id = sp.sandbox_id.clone();
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let before = sb.usage().await.unwrap();
    let spin = "import time\nend = time.time() + 1\nn = 0\nwhile time.time() < end:\n    n += 1\nresult = n\n";
    run_py(&sb, spin).await;
    let used = sb.usage().await.unwrap().cpu_seconds - before.cpu_seconds;
    assert!(used > 0.05, "spinning used no metered cpu: {used}");
    let cpu = Path::new(berth_sandbox::process::CGROUP_ROOT)
        .join("cpu")
        .join(&env.cfg.cgroup_name)
        .join(&id);
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap();
    assert_eq!(quota.trim(), "25000");
    // Every process of the runsc tree (runsc, gofer, sentry, ptrace stubs)
    // sits in the sandbox's cgroups: runsc did not move anything out.
    let want = format!("/{}/{id}", env.cfg.cgroup_name);
    let mut seen = 0;
    for pid in host_processes_of(&sb) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrl, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            if ["memory", "pids", "cpu", "cpuacct"].contains(&ctrl) {
                assert_eq!(path, want, "pid {pid} is in {ctrl}:{path}");
                seen += 1;
            }
        }
    }
    assert!(seen >= 12, "{seen}");
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

/// The sandbox's host pids plus every descendant of them.
fn host_processes_of(sb: &berth_sandbox::Sandbox) -> Vec<u32> {
    let mut all = sb.host_pids();
    let mut i = 0;
    while i < all.len() {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", all[i]))
            .unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
            if !all.contains(&c) {
                all.push(c);
            }
        }
        i += 1;
    }
    all
}
