//! One suite every substrate passes: the agent contract and the isolation
//! properties that do not depend on how a substrate builds its sandbox.
//!
//! A substrate's test file provides a [`Harness`] and expands
//! `conformance_suite!(make_harness)`, which defines one `#[tokio::test]`
//! per case below. Substrate-specific checks (uids, cgroups, overlay
//! layers, VM snapshots) stay in that substrate's own tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use berth_sandbox::{Driver, Sandbox, SandboxSpec};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::common::*;

/// A sandbox's directory in each v1 controller under `parent`, plus the
/// given state directory: the usual traces of a live sandbox.
pub fn cgroup_traces(parent: &str, id: &str, state: PathBuf) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = berth_sandbox::process::CONTROLLERS
        .iter()
        .map(|c| {
            std::path::Path::new(berth_sandbox::process::CGROUP_ROOT)
                .join(c)
                .join(parent)
                .join(id)
        })
        .collect();
    v.push(state);
    v
}

/// What a substrate's test file supplies.
pub trait Harness: Send + Sync + 'static {
    fn driver(&self) -> &dyn Driver;
    /// Host paths that belong to a live sandbox (state directories,
    /// cgroups, sockets) and must all be gone once it is torn down.
    fn traces(&self, sandbox_id: &str) -> Vec<PathBuf>;
    /// Sandbox starts in the T8 loop (the slower substrates do fewer).
    fn t8_starts(&self) -> usize;
    /// How long a sandbox may take to become healthy.
    fn start_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// Expands to one test per conformance case, each on a fresh harness.
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@cases $make;
            requests_reach_one_sandbox,
            fresh_sandbox_after_termination,
            sse_streams_chunk_by_chunk,
            health_status_and_agent_exit,
            unreachable_agent_gives_502,
            memory_past_the_limit_kills_the_agent_not_the_host,
            fork_bomb_is_capped,
            teardown_leaves_nothing,
            t6_escape_probes_fail,
            t8_only_stdio_and_cwd_app,
            t11_no_network_path_out
        );
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                init_tracing();
                let h = $make;
                conformance::$case(&h).await;
            }
        )*
    };
}

pub async fn start(h: &dyn Harness, sp: SandboxSpec) -> Sandbox {
    let sb = h.driver().start(sp).await.unwrap();
    tokio::time::timeout(h.start_timeout(), wait_healthy(&sb))
        .await
        .expect("agent did not become healthy in time");
    sb
}

/// Same sandbox per session: every request reaches the same agent
/// process, and what it left in memory and on disk is still there.
pub async fn requests_reach_one_sandbox(h: &dyn Harness) {
    let app = app(AGENT);
    let sb = start(h, spec("same", app.path())).await;
    let first = run_py(
        &sb,
        "import os, builtins\nbuiltins.berth_mark = 41\nopen('/tmp/mark', 'w').write('m')\nresult = os.getpid()",
    )
    .await;
    for _ in 0..3 {
        let v = run_py(
            &sb,
            "import os, builtins\nbuiltins.berth_mark += 1\nresult = [os.getpid(), builtins.berth_mark, open('/tmp/mark').read()]",
        )
        .await;
        assert_eq!(v[0], first, "a later request reached another process");
        assert_eq!(v[2], "m");
    }
    let v = run_py(&sb, "import builtins\nresult = builtins.berth_mark").await;
    assert_eq!(v, 44);
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

/// A sandbox started after another ended sees nothing the first wrote.
pub async fn fresh_sandbox_after_termination(h: &dyn Harness) {
    let app = app(AGENT);
    let sb = start(h, spec("fresh", app.path())).await;
    run_py(
        &sb,
        "open('/tmp/left', 'w').write('x')\nopen('/app/left.txt', 'w').write('x')\nresult = 1",
    )
    .await;
    sb.terminate(Duration::from_secs(1)).await.unwrap();
    let sb = start(h, spec("fresh", app.path())).await;
    let v = run_py(
        &sb,
        "import os\nresult = [os.path.exists('/tmp/left'), os.path.exists('/app/left.txt')]",
    )
    .await;
    assert_eq!(v, json!([false, false]), "state leaked across sandboxes");
    assert!(
        !app.path().join("left.txt").exists(),
        "a sandbox wrote into the version's files"
    );
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// SSE chunks reach the host as the agent writes them, not at the end.
pub async fn sse_streams_chunk_by_chunk(h: &dyn Harness) {
    let app = app(AGENT);
    let sb = start(h, spec("sse", app.path())).await;
    let req = Request::get("/stream").body(body("")).unwrap();
    let resp = sb.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body();
    let mut events: Vec<(f64, f64)> = Vec::new();
    let mut text = String::new();
    while let Some(frame) = stream.frame().await {
        let received = now_secs();
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                let v: Value =
                    serde_json::from_str(event.trim().trim_start_matches("data: ")).unwrap();
                events.push((v["t"].as_f64().unwrap(), received));
            }
        }
    }
    assert_eq!(events.len(), 5);
    // Guest clocks may differ from the host's by a little; the agent
    // pauses 0.3 s between events, so the first one arriving before the
    // fourth was sent is proof enough of streaming.
    let first_received = events[0].1 - events[0].0;
    let fourth_sent = events[3].0 - events[0].0;
    assert!(
        first_received.abs() < fourth_sent,
        "first chunk came {first_received:.3}s after it was sent, later than the 4th was sent ({fourth_sent:.3}s): buffered"
    );
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

/// Health: the guest reports the agent running; when the agent exits the
/// sandbox ends and its exit code is known.
pub async fn health_status_and_agent_exit(h: &dyn Harness) {
    let app = app(AGENT);
    let sb = start(h, spec("health", app.path())).await;
    let st = sb.guest_status().await.unwrap();
    assert!(st.running && st.agent_pid.is_some(), "{st:?}");
    let mut exited = sb.exited();
    let req = Request::post("/run")
        .body(body("import os\nos._exit(7)"))
        .unwrap();
    let _ = sb.request(req).await;
    tokio::time::timeout(Duration::from_secs(20), exited.wait_for(|e| *e))
        .await
        .expect("the sandbox did not end after its agent exited")
        .unwrap();
    let st = sb.guest_status().await.unwrap();
    assert!(!st.running);
    assert_eq!(st.exit_code, Some(7), "{st:?}");
    sb.terminate(Duration::from_millis(100)).await.unwrap();
}

/// An agent that never listens: the guest answers 502 with a JSON code,
/// and the guest's own endpoints cannot be reached through the relay.
pub async fn unreachable_agent_gives_502(h: &dyn Harness) {
    let app = app("import time\ntime.sleep(600)\n");
    let mut sp = spec("noport", app.path());
    sp.snapshot = false;
    let sb = h.driver().start(sp).await.unwrap();
    let (status, bytes) = call(&sb, "POST", "/invocations", "{}").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["code"], "agent_unreachable");
    let reserved = Request::post("/_berth/shutdown").body(body("")).unwrap();
    assert!(matches!(
        sb.request(reserved).await,
        Err(berth_sandbox::DriverError::ReservedPath(_))
    ));
    sb.terminate(Duration::from_millis(300)).await.unwrap();
}

/// Past its memory limit the agent is killed; the host and the driver go on.
pub async fn memory_past_the_limit_kills_the_agent_not_the_host(h: &dyn Harness) {
    let app = app(AGENT);
    let mut sp = spec("oom", app.path());
    sp.limits.memory_bytes = 128 << 20;
    let sb = start(h, sp).await;
    let mut exited = sb.exited();
    let req = Request::post("/run")
        // In small touched chunks: one huge allocation is refused up front
        // by a VM's overcommit check instead of reaching the limit.
        .body(body(
            "chunks = []\nfor _ in range(75):\n    chunks.append(b'x' * (8 << 20))\nresult = len(chunks)",
        ))
        .unwrap();
    if let Ok(resp) = sb.request(req).await {
        assert_ne!(
            resp.status(),
            StatusCode::OK,
            "600 MB allocated under a 128 MB limit"
        );
    }
    tokio::time::timeout(Duration::from_secs(30), exited.wait_for(|e| *e))
        .await
        .expect("the sandbox did not end after the OOM")
        .unwrap();
    let st = sb.guest_status().await.unwrap();
    assert!(!st.running, "{st:?}");
    assert_eq!(st.signal, Some(9), "the agent should be OOM-killed: {st:?}");
    sb.terminate(Duration::from_millis(100)).await.unwrap();
    // The driver still works.
    let sb = start(h, spec("after-oom", app.path())).await;
    sb.terminate(Duration::from_millis(300)).await.unwrap();
}

/// A fork bomb stops at the pids limit.
pub async fn fork_bomb_is_capped(h: &dyn Harness) {
    let app = app(AGENT);
    let mut sp = spec("forkbomb", app.path());
    sp.limits.pids = 32;
    let sb = start(h, sp).await;
    let code = r#"
import os, time
kids, errors = [], 0
for _ in range(200):
    try:
        pid = os.fork()
        if pid == 0:
            # A small process per fork, so memory limits stay out of it.
            try:
                os.execv("/bin/sleep", ["sleep", "30"])
            finally:
                os._exit(0)
        kids.append(pid)
    except OSError:
        errors += 1
result = {"forked": len(kids), "errors": errors}
"#;
    let v = run_py(&sb, code).await;
    let forked = v["forked"].as_u64().unwrap();
    assert!(forked < 32, "forked {forked} processes under a limit of 32");
    assert!(v["errors"].as_u64().unwrap() > 0);
    sb.terminate(Duration::from_millis(300)).await.unwrap();
}

/// After terminate nothing of the sandbox is left on the host, even with
/// a process inside that ignores SIGTERM.
pub async fn teardown_leaves_nothing(h: &dyn Harness) {
    let app = app(AGENT);
    let sp = spec("down", app.path());
    let id = sp.sandbox_id.clone();
    let sb = start(h, sp).await;
    run_py(
        &sb,
        "import subprocess\nsubprocess.Popen(['/bin/sh', '-c', 'trap \"\" TERM; sleep 60'])\nresult = 1",
    )
    .await;
    let pids = sb.host_pids();
    assert!(!pids.is_empty());
    let traces = h.traces(&id);
    let live: Vec<&PathBuf> = traces.iter().filter(|p| p.exists()).collect();
    assert!(
        !live.is_empty(),
        "no host traces of a live sandbox: {traces:?}"
    );
    sb.terminate(Duration::from_millis(300)).await.unwrap();
    for pid in pids {
        let alive = proc_status(pid).is_some_and(|s| !s["State"].starts_with('Z'));
        assert!(!alive, "pid {pid} survived the teardown");
    }
    for p in traces {
        assert!(!p.exists(), "{p:?} left behind");
    }
}

const INSIDE_ESCAPES: &str = r#"
import ctypes, os, subprocess, errno
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sys(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
def opens(path, mode="rb"):
    try:
        open(path, mode).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, "?")
def chdir(path):
    try:
        os.chdir(path)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, "?")
    finally:
        os.chdir("/app")
sib = subprocess.Popen(["/bin/sleep", "30"])
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17
result = {
    "ptrace_attach": sys(101, 16, sib.pid, 0, 0),
    "unshare_user": sys(272, CLONE_NEWUSER),
    "unshare_net": sys(272, CLONE_NEWNET),
    "clone_user": sys(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "bpf": sys(321, 0, 0, 0),
    "perf_event_open": sys(298, 0, 0, -1, -1, 0),
    "userfaultfd": sys(323, 0),
    "io_uring_setup": sys(425, 1, 0),
    "keyctl": sys(250, 0, 0, 0, 0, 0),
    "mount": sys(165, 0, 0, 0, 0, 0),
    "chroot": sys(161, 0),
    "kcore": opens("/proc/kcore"),
    "kvm": opens("/dev/kvm"),
    "self_exe_write": opens("/proc/self/exe", "r+b"),
    "guest_exe": opens("/proc/1/exe"),
    "guest_root": chdir("/proc/1/root"),
    "fd_chdir": [chdir(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)],
}
sib.kill()
"#;

/// T6: escape probes from inside all fail, and host binaries are unchanged.
pub async fn t6_escape_probes_fail(h: &dyn Harness) {
    let app = app(AGENT);
    let python = std::fs::read("/usr/bin/python3").unwrap();
    let sb = start(h, spec("t6", app.path())).await;
    let v = run_py(&sb, INSIDE_ESCAPES).await;
    for (probe, outcome) in v.as_object().unwrap() {
        let outcomes: Vec<&Value> = match outcome {
            Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for o in outcomes {
            assert_ne!(o, "ok", "escape probe {probe} succeeded: {v}");
        }
    }
    assert_eq!(
        std::fs::read("/usr/bin/python3").unwrap(),
        python,
        "host binary changed"
    );
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

/// T8: every agent starts with exactly fds 0, 1, 2 and cwd /app.
pub async fn t8_only_stdio_and_cwd_app(h: &dyn Harness) {
    let app = app(AGENT);
    for _ in 0..h.t8_starts() {
        let sb = start(h, spec("t8", app.path())).await;
        let (_, bytes) = call(&sb, "GET", "/startup", "").await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["fds"], json!([0, 1, 2]), "agent inherited descriptors");
        assert_eq!(v["cwd"], "/app");
        sb.terminate(Duration::from_secs(1)).await.unwrap();
    }
}

const INSIDE_NET: &str = r#"
import socket, urllib.request, json
def connect(family, addr):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return type(e).__name__
    s.settimeout(2)
    try:
        s.connect(addr)
        return "connected"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
own = json.load(urllib.request.urlopen("http://127.0.0.1:8080/whoami", timeout=5))["mark"]
ifaces = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
result = {
    "host_tcp": connect(socket.AF_INET, ("127.0.0.1", HOST_PORT)),
    "host_tcp6": connect(socket.AF_INET6, ("::1", HOST_PORT)),
    "host_abstract": connect(socket.AF_UNIX, "\0" + ABSTRACT),
    "own_port_mark": own,
    "ifaces": ifaces,
}
"#;

/// T11: no path from inside to host loopback listeners or host abstract
/// sockets; only `lo` exists; port 8080 inside is the sandbox's own agent.
pub async fn t11_no_network_path_out(h: &dyn Harness) {
    let app = app(AGENT);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let abstract_name = format!("berth-canary-{}-{}", std::process::id(), port);
    let abstract_addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            abstract_name.as_bytes(),
        )
        .unwrap();
    let unix = std::os::unix::net::UnixListener::bind_addr(&abstract_addr).unwrap();
    unix.set_nonblocking(true).unwrap();
    let mut sandboxes = Vec::new();
    for mark in ["a", "b"] {
        let mut sp = spec("t11", app.path());
        sp.env.push(("MARK".into(), mark.into()));
        sandboxes.push(start(h, sp).await);
    }
    for (sb, mark) in sandboxes.iter().zip(["a", "b"]) {
        let code = format!("HOST_PORT = {port}\nABSTRACT = {abstract_name:?}\n{INSIDE_NET}");
        let v = run_py(sb, &code).await;
        for probe in ["host_tcp", "host_tcp6", "host_abstract"] {
            assert_ne!(v[probe], "connected", "{probe} reached the host: {v}");
        }
        assert_eq!(v["own_port_mark"], mark, "port 8080 was another sandbox's");
        assert_eq!(v["ifaces"], json!(["lo"]), "{v}");
    }
    assert!(
        listener.accept().is_err(),
        "the host listener saw a connection"
    );
    assert!(
        unix.accept().is_err(),
        "the host abstract socket saw a connection"
    );
    for sb in sandboxes {
        sb.terminate(Duration::from_secs(1)).await.unwrap();
    }
}
