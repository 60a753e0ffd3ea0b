//! The OCI bundle of one sandbox: `config.json` and a nearly empty root.
//!
//! Layout under `<state_dir>/<sandbox_id>/`:
//! `bundle/config.json`, `bundle/rootfs/` (usrmerge symlinks, a generated
//! `/etc`, mount points), `spec.json` (the guest's spec) and `runsc/` (the
//! runtime's state, `--root`).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{symlink, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use berth_guest::proto::GuestSpec;
use serde_json::{json, Value};

use super::GvisorConfig;
use crate::{DriverError, SandboxSpec};

/// Where the guest binary and its spec appear inside the sandbox.
pub const GUEST_PATH: &str = "/.berth/guest";
pub const SPEC_PATH: &str = "/.berth/spec.json";

/// Paths of one sandbox's state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path, id: &str) -> Self {
        Layout {
            dir: state_dir.join(id),
        }
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.bundle().join("rootfs")
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn runsc_root(&self) -> PathBuf {
        self.dir.join("runsc")
    }
}

/// Writes the bundle, the guest's spec and the runtime's state directory.
pub fn write(layout: &Layout, cfg: &GvisorConfig, spec: &SandboxSpec) -> Result<(), DriverError> {
    let rootfs = layout.rootfs();
    for dir in [rootfs.join("etc"), layout.runsc_root()] {
        fs::create_dir_all(&dir).map_err(DriverError::io("create", &dir))?;
    }
    write_root(&rootfs, cfg)?;
    let guest = guest_spec(cfg, spec);
    let path = layout.spec();
    let json =
        serde_json::to_vec(&guest).map_err(|e| DriverError::io("encode", &path)(e.into()))?;
    // Only the guest, still uid 0 inside when it reads it, may read the
    // spec; the agent's uid cannot (it holds the agent's environment).
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&json))
        .map_err(DriverError::io("write", &path))?;
    let config = config(layout, cfg, spec);
    let path = layout.bundle().join("config.json");
    let json = serde_json::to_vec_pretty(&config)
        .map_err(|e| DriverError::io("encode", &path)(e.into()))?;
    fs::write(&path, json).map_err(DriverError::io("write", &path))
}

/// The guest's spec. Fields only the process substrate's setup uses get
/// in-sandbox values that mean nothing here (no cgroups to join, the
/// runtime built the root and `/app`).
fn guest_spec(cfg: &GvisorConfig, spec: &SandboxSpec) -> GuestSpec {
    GuestSpec {
        sandbox_id: spec.sandbox_id.clone(),
        root_dir: PathBuf::from("/"),
        upper_dir: PathBuf::from("/app"),
        work_dir: PathBuf::from("/app"),
        app_dir: PathBuf::from("/app"),
        venv_dir: spec.venv_dir.as_ref().map(|_| PathBuf::from("/venv")),
        entrypoint: spec.entrypoint.clone(),
        env: spec.env.clone(),
        agent_port: spec.agent_port,
        uid: cfg.agent_uid,
        gid: cfg.agent_uid,
        cgroup_procs: Vec::new(),
        tmp_size_mb: cfg.tmp_size_mb,
        readonly_host_paths: Vec::new(),
        nofile: cfg.nofile,
        nproc: spec.limits.pids,
    }
}

/// usrmerge symlinks, `/etc` files, and the mount points of file mounts
/// (the root is read-only, so the runtime cannot create them).
fn write_root(rootfs: &Path, cfg: &GvisorConfig) -> Result<(), DriverError> {
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        if let Ok(target) = fs::read_link(Path::new("/").join(name)) {
            let link = rootfs.join(name);
            symlink(&target, &link).map_err(DriverError::io("symlink", &link))?;
        }
    }
    for dir in ["app", "tmp", "proc", "dev", "venv", ".berth"] {
        let path = rootfs.join(dir);
        fs::create_dir_all(&path).map_err(DriverError::io("create", &path))?;
    }
    for file in [GUEST_PATH, SPEC_PATH] {
        touch(&rootfs.join(&file[1..]))?;
    }
    for host in existing(&cfg.readonly_host_paths) {
        let dst = rootfs.join(host.strip_prefix("/").unwrap_or(host));
        if host.is_dir() {
            fs::create_dir_all(&dst).map_err(DriverError::io("create", &dst))?;
        } else {
            touch(&dst)?;
        }
    }
    let uid = cfg.agent_uid;
    let files = [
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 agent:x:{uid}:{uid}:agent:/tmp:/usr/sbin/nologin\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        (
            "group",
            format!("root:x:0:\nagent:x:{uid}:\nnogroup:x:65534:\n"),
        ),
        ("hostname", "berth\n".to_string()),
        (
            "hosts",
            "127.0.0.1 localhost berth\n::1 localhost\n".to_string(),
        ),
    ];
    for (name, content) in files {
        let path = rootfs.join("etc").join(name);
        fs::write(&path, content).map_err(DriverError::io("write", &path))?;
    }
    Ok(())
}

fn touch(path: &Path) -> Result<(), DriverError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(DriverError::io("create", parent))?;
    }
    fs::write(path, b"").map_err(DriverError::io("write", path))
}

fn existing(paths: &[PathBuf]) -> impl Iterator<Item = &PathBuf> {
    paths.iter().filter(|p| p.is_absolute() && p.exists())
}

fn bind(dst: &str, src: &Path, mode: &str) -> Value {
    json!({
        "destination": dst,
        "type": "bind",
        "source": src,
        "options": ["rbind", mode, "nosuid", "nodev"],
    })
}

/// The OCI runtime spec. The guest starts as uid 0 *of the sandbox's
/// kernel* with three capabilities: CHOWN to hand `/app` to the agent,
/// SETUID/SETGID to become the agent's uid; it drops all of them before
/// it reports ready. `/app` is a read-write bind of the version's directory
/// that runsc's in-memory overlay (`--overlay2=all:memory`) keeps private.
fn config(layout: &Layout, cfg: &GvisorConfig, spec: &SandboxSpec) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "noexec", "mode=755", "size=64k"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "mode=1777", format!("size={}m", cfg.tmp_size_mb)]}),
    ];
    for host in existing(&cfg.readonly_host_paths) {
        mounts.push(bind(&host.to_string_lossy(), host, "ro"));
    }
    mounts.push(bind("/app", &spec.app_dir, "rw"));
    if let Some(venv) = &spec.venv_dir {
        mounts.push(bind("/venv", venv, "ro"));
    }
    mounts.push(bind(GUEST_PATH, &cfg.guest_binary, "ro"));
    mounts.push(bind(SPEC_PATH, &layout.spec(), "ro"));
    let caps = ["CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"];
    let rlimit = |kind: &str, n: u64| json!({"type": kind, "hard": n, "soft": n});
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [GUEST_PATH, "oci", SPEC_PATH],
            "env": [],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": true,
            "rlimits": [
                rlimit("RLIMIT_NOFILE", cfg.nofile),
                rlimit("RLIMIT_NPROC", spec.limits.pids),
                rlimit("RLIMIT_CORE", 0),
            ],
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "berth",
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"},
            ],
            "resources": {
                "memory": {"limit": spec.limits.memory_bytes},
                "pids": {"limit": spec.limits.pids},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::Limits;

    fn spec(venv: Option<&str>) -> SandboxSpec {
        SandboxSpec {
            sandbox_id: "sb-1".into(),
            app_dir: "/srv/app".into(),
            venv_dir: venv.map(PathBuf::from),
            entrypoint: vec!["python3".into(), "main.py".into()],
            env: vec![("SECRET".into(), "x".into())],
            limits: Limits {
                vcpus: 1.0,
                memory_bytes: 256 << 20,
                pids: 32,
            },
            agent_port: 8080,
            session_id: "s".into(),
            snapshot: false,
        }
    }

    fn mount<'a>(config: &'a Value, dst: &str) -> Option<&'a Value> {
        config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == dst)
    }

    #[test]
    fn process_is_the_guest_with_three_capabilities_and_no_env() {
        let cfg = GvisorConfig::new("/state", "/opt/berth-guest");
        let layout = Layout::new(&cfg.state_dir, "sb-1");
        let c = config(&layout, &cfg, &spec(None));
        let p = &c["process"];
        assert_eq!(p["args"], json!([GUEST_PATH, "oci", SPEC_PATH]));
        // The agent's environment goes through the guest spec, not runsc.
        assert_eq!(p["env"], json!([]));
        assert_eq!(p["noNewPrivileges"], true);
        let caps = json!(["CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"]);
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(p["capabilities"][set], caps);
        }
        assert!(p["capabilities"].get("ambient").is_none());
        assert!(p["capabilities"].get("inheritable").is_none());
        assert_eq!(c["root"]["readonly"], true);
        let kinds: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["pid", "network", "ipc", "uts", "mount"]);
    }

    #[test]
    fn mounts_are_read_only_but_app_and_tmp() {
        let cfg = GvisorConfig::new("/state", "/opt/berth-guest");
        let layout = Layout::new(&cfg.state_dir, "sb-1");
        let c = config(&layout, &cfg, &spec(Some("/srv/venv")));
        for m in c["mounts"].as_array().unwrap() {
            if m["type"] != "bind" {
                continue;
            }
            let opts = m["options"].as_array().unwrap();
            let want = if m["destination"] == "/app" {
                "rw"
            } else {
                "ro"
            };
            assert!(opts.contains(&json!(want)), "{m}");
            assert!(opts.contains(&json!("nosuid")), "{m}");
        }
        assert_eq!(mount(&c, "/app").unwrap()["source"], "/srv/app");
        assert_eq!(mount(&c, "/venv").unwrap()["source"], "/srv/venv");
        assert_eq!(
            mount(&c, SPEC_PATH).unwrap()["source"],
            "/state/sb-1/spec.json"
        );
        let tmp = mount(&c, "/tmp").unwrap();
        assert!(tmp["options"]
            .as_array()
            .unwrap()
            .contains(&json!("size=256m")));
        assert!(mount(&c, "/").is_none());
        let without = config(&layout, &cfg, &spec(None));
        assert!(mount(&without, "/venv").is_none());
    }

    #[test]
    fn guest_spec_names_paths_inside() {
        let cfg = GvisorConfig::new("/state", "/opt/berth-guest");
        let g = guest_spec(&cfg, &spec(Some("/srv/venv")));
        assert_eq!(g.venv_dir, Some(PathBuf::from("/venv")));
        assert_eq!(g.uid, cfg.agent_uid);
        assert_ne!(g.uid, 0);
        assert!(g.cgroup_procs.is_empty());
        assert_eq!(g.nproc, 32);
        assert_eq!(g.env, vec![("SECRET".to_string(), "x".to_string())]);
    }
}
