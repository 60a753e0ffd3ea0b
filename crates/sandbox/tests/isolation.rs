//! T6, T7, T8, T9, T11: what a process inside a sandbox can see and do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use berth_sandbox::{Driver, Sandbox};
use common::*;
use serde_json::{json, Value};

async fn started(env: &Env, prefix: &str, app: &std::path::Path) -> Sandbox {
    let sb = env.driver.start(spec(prefix, app)).await.unwrap();
    wait_healthy(&sb).await;
    sb
}

/// T7 from the host: every process in the cgroup is confined and runs as
/// the sandbox's uid. Returns that uid.
fn check_host_view(sb: &Sandbox, env: &Env) -> u32 {
    let pids = sb.host_pids();
    assert!(
        pids.len() >= 3,
        "expected guest parent, guest, agent, child: {pids:?}"
    );
    let mut uids = HashSet::new();
    for pid in pids {
        let Some(st) = proc_status(pid) else { continue };
        assert_eq!(
            st["Seccomp"], "2",
            "pid {pid} ({}) without seccomp",
            st["Name"]
        );
        assert_eq!(
            st["NoNewPrivs"], "1",
            "pid {pid} ({}) without no_new_privs",
            st["Name"]
        );
        assert_eq!(
            st["CapEff"], "0000000000000000",
            "pid {pid} ({}) has capabilities",
            st["Name"]
        );
        assert_eq!(
            st["CapPrm"], "0000000000000000",
            "pid {pid} ({}) has capabilities",
            st["Name"]
        );
        let ids: Vec<&str> = st["Uid"].split_whitespace().collect();
        assert!(
            ids.iter().all(|u| *u == ids[0]),
            "pid {pid} mixed uids {ids:?}"
        );
        let gids: Vec<&str> = st["Gid"].split_whitespace().collect();
        assert!(gids.iter().all(|g| *g == ids[0]), "pid {pid} gids {gids:?}");
        assert_eq!(st["Groups"], "", "pid {pid} supplementary groups");
        uids.insert(ids[0].parse::<u32>().unwrap());
    }
    assert_eq!(uids.len(), 1, "one uid per sandbox: {uids:?}");
    let uid = *uids.iter().next().unwrap();
    let range = env.cfg.uid_base..env.cfg.uid_base + env.cfg.uid_count;
    assert!(range.contains(&uid), "uid {uid} outside the sandbox range");
    uid
}

const INSIDE_STATUS: &str = r#"
import os, subprocess
child = subprocess.Popen(["/usr/bin/sleep", "30"])
seen = {}
for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines())
    except OSError:
        continue
    seen[pid] = {k: st[k].strip() for k in ("Name", "Seccomp", "NoNewPrivs", "CapEff", "Uid")}
result = {"self_uid": os.getuid(), "procs": seen}
"#;

#[tokio::test]
async fn t7_every_process_is_confined_with_its_own_uid() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let (a, b) = tokio::join!(
        started(&env, "t7a", app.path()),
        started(&env, "t7b", app.path())
    );
    let mut uids = Vec::new();
    for sb in [&a, &b] {
        let inside = run_py(sb, INSIDE_STATUS).await;
        let procs = inside["procs"].as_object().unwrap();
        assert!(
            procs.len() >= 3,
            "guest, agent and sleep visible inside: {procs:?}"
        );
        for (pid, st) in procs {
            assert_eq!(st["Seccomp"], "2", "inside pid {pid}: {st}");
            assert_eq!(st["NoNewPrivs"], "1", "inside pid {pid}: {st}");
            assert_eq!(st["CapEff"], "0000000000000000", "inside pid {pid}: {st}");
        }
        let uid = check_host_view(sb, &env);
        assert_eq!(inside["self_uid"].as_u64().unwrap(), uid as u64);
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "two sandboxes must not share a uid");
    for sb in [a, b] {
        sb.terminate(Duration::from_secs(1)).await.unwrap();
    }
}

#[tokio::test]
async fn t8_agents_start_with_only_stdio_and_cwd_app() {
    init_tracing();
    const STARTS: usize = 200;
    const PARALLEL: usize = 4;
    let env = std::sync::Arc::new(env());
    let app = std::sync::Arc::new(app(AGENT));
    let mut tasks = Vec::new();
    for worker in 0..PARALLEL {
        let (env, app) = (env.clone(), app.clone());
        tasks.push(tokio::spawn(async move {
            for _ in (worker..STARTS).step_by(PARALLEL) {
                let sb = started(&env, "t8", app.path()).await;
                let (_, bytes) = call(&sb, "GET", "/startup", "").await;
                let v: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(
                    v["fds"],
                    json!([0, 1, 2]),
                    "agent inherited extra descriptors"
                );
                assert_eq!(v["cwd"], "/app");
                sb.terminate(Duration::from_secs(1)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

const INSIDE_VIEW: &str = r#"
import os, socket
def exists(p):
    return os.path.lexists(p)
def try_write(p):
    try:
        with open(p, "w") as f:
            f.write("x")
        return True
    except OSError:
        return False
ns = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("pid", "mnt", "net", "ipc", "uts", "cgroup")}
ifaces = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
result = {
    "ns": ns,
    "canaries": [exists(p) for p in CANARIES],
    "work": exists("/work"), "root_home": exists("/root"),
    "sys": exists("/sys") and try_write("/sys/berth"),
    "sys_exists": exists("/sys"),
    "ifaces": ifaces,
    "app_new": try_write("/app/new.txt"),
    "app_main_overwrite": try_write("/app/main.py"),
    "tmp": try_write("/tmp/x"),
    "root_write": try_write("/evil"),
    "usr_write": try_write("/usr/evil"),
    "etc_write": try_write("/etc/passwd"),
    "hostname": socket.gethostname(),
    "dev": sorted(os.listdir("/dev")),
}
"#;

#[tokio::test]
async fn t9_namespaces_and_filesystem() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let canaries = [
        format!("/tmp/berth-canary-{}", std::process::id()),
        format!("/root/berth-canary-{}", std::process::id()),
    ];
    for c in &canaries {
        std::fs::write(c, "host secret").unwrap();
    }
    let sp = spec("t9", app.path());
    let upper = env.cfg.state_dir.join(&sp.sandbox_id).join("upper");
    let sb = env.driver.start(sp).await.unwrap();
    wait_healthy(&sb).await;
    let code = format!("CANARIES = {:?}\n{INSIDE_VIEW}", canaries);
    let v = run_py(&sb, &code).await;
    for (name, inside) in v["ns"].as_object().unwrap() {
        let host = std::fs::read_link(format!("/proc/self/ns/{name}")).unwrap();
        assert_ne!(
            inside.as_str().unwrap(),
            host.to_str().unwrap(),
            "{name} namespace shared with host"
        );
    }
    assert_eq!(
        v["canaries"],
        json!([false, false]),
        "host files visible inside"
    );
    assert_eq!(v["work"], false, "/work visible inside");
    assert_eq!(v["root_home"], false, "/root visible inside");
    assert_eq!(v["sys"], false, "/sys writable inside");
    assert_eq!(v["ifaces"], json!(["lo"]));
    assert_eq!(v["app_new"], true, "/app must be writable (overlay)");
    assert_eq!(v["app_main_overwrite"], false, "version files are root's");
    assert_eq!(v["tmp"], true);
    assert_eq!(v["root_write"], false);
    assert_eq!(v["usr_write"], false);
    assert_eq!(v["etc_write"], false);
    assert_eq!(v["hostname"], "berth");
    assert!(
        !app.path().join("new.txt").exists(),
        "write leaked into the version's directory"
    );
    assert!(
        upper.join("new.txt").exists(),
        "write did not land in the overlay upper layer"
    );
    let dev: Vec<String> = serde_json::from_value(v["dev"].clone()).unwrap();
    assert!(
        !dev.iter()
            .any(|d| d == "kvm" || d == "mem" || d.starts_with("sd") || d.starts_with("vd")),
        "{dev:?}"
    );
    for c in &canaries {
        std::fs::remove_file(c).unwrap();
    }
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}

const INSIDE_NET: &str = r#"
import socket, urllib.request, json
def connect(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(addr)
        return "connected"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
own = json.load(urllib.request.urlopen("http://127.0.0.1:8080/whoami", timeout=2))["mark"]
result = {
    "host_tcp": connect(socket.AF_INET, ("127.0.0.1", HOST_PORT)),
    "host_tcp6": connect(socket.AF_INET6, ("::1", HOST_PORT)),
    "host_abstract": connect(socket.AF_UNIX, "\0" + ABSTRACT),
    "own_port_mark": own,
}
"#;

#[tokio::test]
async fn t11_no_network_path_out() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let abstract_name = format!("berth-canary-{}", std::process::id());
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
        let sb = env.driver.start(sp).await.unwrap();
        wait_healthy(&sb).await;
        sandboxes.push(sb);
    }
    for (sb, mark) in sandboxes.iter().zip(["a", "b"]) {
        let code = format!("HOST_PORT = {port}\nABSTRACT = {abstract_name:?}\n{INSIDE_NET}");
        let v = run_py(sb, &code).await;
        assert_ne!(
            v["host_tcp"], "connected",
            "reached a host loopback listener"
        );
        assert_ne!(
            v["host_tcp6"], "connected",
            "reached a host loopback listener"
        );
        assert_ne!(
            v["host_abstract"], "connected",
            "reached a host abstract socket"
        );
        // 127.0.0.1:8080 inside is the sandbox's own agent, never another's.
        assert_eq!(v["own_port_mark"], mark);
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
sib = subprocess.Popen(["/usr/bin/sleep", "30"])
CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x40000000, 17
result = {
    "ptrace_attach": sys(101, 16, sib.pid, 0, 0),
    "unshare_user": sys(272, CLONE_NEWUSER),
    "unshare_net": sys(272, CLONE_NEWNET),
    "clone_user": sys(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
    "clone3": sys(435, 0, 0),
    "setns": sys(308, 0, 0),
    "bpf": sys(321, 0, 0, 0),
    "perf_event_open": sys(298, 0, 0, -1, -1, 0),
    "userfaultfd": sys(323, 0),
    "io_uring_setup": sys(425, 1, 0),
    "keyctl": sys(250, 0, 0, 0, 0, 0),
    "mount": sys(165, 0, 0, 0, 0, 0),
    "chroot": sys(161, 0),
    "personality": sys(135, 0x0040000),
    "kcore": opens("/proc/kcore"),
    "kvm": opens("/dev/kvm"),
    "self_exe_write": opens("/proc/self/exe", "r+b"),
    "guest_exe": opens("/proc/1/exe"),
    "guest_root": chdir("/proc/1/root"),
    "fd_chdir": [chdir(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)],
}
sib.kill()
"#;

#[tokio::test]
async fn t6_escape_probes_fail() {
    init_tracing();
    let env = env();
    let app = app(AGENT);
    let python = std::fs::read("/usr/bin/python3").unwrap();
    let sb = started(&env, "t6", app.path()).await;
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
    assert_eq!(v["ptrace_attach"], "EPERM");
    assert_eq!(v["unshare_user"], "EPERM");
    assert_eq!(v["clone3"], "ENOSYS");
    assert_eq!(
        std::fs::read("/usr/bin/python3").unwrap(),
        python,
        "host binary changed"
    );
    sb.terminate(Duration::from_secs(1)).await.unwrap();
}
