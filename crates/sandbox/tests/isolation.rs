//! T7 and T9 on the process substrate: uids, namespaces and layers seen
//! from the host (T6, T8 and T11 are in the conformance suite).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use berth_sandbox::{Driver, Sandbox};
use common::*;
use serde_json::json;

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
