//! Shared helpers: a real guest binary, a driver per test, python agents.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_sandbox::process::{ProcessConfig, ProcessDriver};
use berth_sandbox::{BoxBody, Limits, Sandbox, SandboxSpec};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

pub const PYTHON: &str = "/usr/bin/python3";

/// A python agent on http.server: /ping, /invocations (echo), /stream (SSE
/// with pauses), /run (executes the posted python, returns `result`).
pub const AGENT: &str = r#"
import json, os, sys, time, traceback

def open_fds():
    fds = []
    for fd in range(4096):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            pass
    return fds

# Taken before anything opens a descriptor: what the agent was given.
STARTUP = {"fds": open_fds(), "cwd": os.getcwd()}

from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, code, obj, ctype="application/json"):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/ping":
            return self.reply(200, {"status": "Healthy", "time_of_last_update": int(time.time())})
        if self.path == "/startup":
            return self.reply(200, STARTUP)
        if self.path == "/whoami":
            return self.reply(200, {"mark": os.environ.get("MARK")})
        if self.path.startswith("/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(5):
                self.wfile.write(("data: {\"i\": %d, \"t\": %f}\n\n" % (i, time.time())).encode())
                self.wfile.flush()
                time.sleep(0.3)
            return
        self.reply(404, {"error": "no such path"})
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n)
        if self.path == "/invocations":
            return self.reply(200, {"echo": data.decode(), "headers": dict(self.headers)})
        if self.path == "/run":
            scope = {"result": None}
            try:
                exec(data.decode(), scope)
                return self.reply(200, {"result": scope["result"]})
            except BaseException:
                return self.reply(500, {"error": traceback.format_exc()})
        self.reply(404, {"error": "no such path"})

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), H).serve_forever()
"#;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Requires root and cgroup v1; fails loudly otherwise.
pub fn require_host() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the sandbox tests need root (namespaces, cgroups, mounts)"
    );
    for c in berth_sandbox::process::CONTROLLERS {
        let p = Path::new(berth_sandbox::process::CGROUP_ROOT).join(c);
        assert!(
            p.join("cgroup.procs").exists(),
            "cgroup v1 controller {c} missing at {p:?}"
        );
    }
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is needed for the test agents"
    );
}

/// Builds (once) and returns the dev guest binary.
pub fn guest_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("BERTH_GUEST_BINARY") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().unwrap();
        let bin = exe
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("berth-guest-dev");
        if up_to_date(&bin) {
            return bin;
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
        let status = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "-p",
                "berth-guest",
                "--bin",
                "berth-guest-dev",
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .expect("run cargo build for the guest");
        assert!(status.success(), "building berth-guest-dev failed");
        assert!(bin.exists(), "guest binary not found at {bin:?}");
        bin
    })
    .clone()
}

/// The binary is newer than every file of the guest crate.
fn up_to_date(bin: &Path) -> bool {
    let Ok(built) = std::fs::metadata(bin).and_then(|m| m.modified()) else {
        return false;
    };
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest");
    let mut stack = vec![guest];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.modified().unwrap() > built {
                return false;
            }
        }
    }
    true
}

pub struct Env {
    pub driver: ProcessDriver,
    pub state: tempfile::TempDir,
    pub cfg: ProcessConfig,
}

/// A driver with its own cgroup parent, state dir and uid range.
pub fn env() -> Env {
    require_host();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let state = tempfile::Builder::new()
        .prefix("berth-state")
        .tempdir()
        .unwrap();
    let mut cfg = ProcessConfig::new(state.path(), guest_binary());
    cfg.cgroup_name = format!("berth-test-{}-{n}", std::process::id());
    cfg.uid_base = 300_000 + n * 2_000;
    cfg.uid_count = 2_000;
    cfg.tmp_size_mb = 64;
    let driver = ProcessDriver::new(cfg.clone()).unwrap();
    Env { driver, state, cfg }
}

impl Drop for Env {
    fn drop(&mut self) {
        for dir in berth_sandbox::process::CONTROLLERS.iter().map(|c| {
            Path::new(berth_sandbox::process::CGROUP_ROOT)
                .join(c)
                .join(&self.cfg.cgroup_name)
        }) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Writes the agent into a fresh app directory.
pub fn app(code: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("berth-app")
        .tempdir()
        .unwrap();
    std::fs::write(dir.path().join("main.py"), code).unwrap();
    dir
}

pub fn unique_id(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}-{}-{n}", std::process::id())
}

pub fn spec(prefix: &str, app: &Path) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: unique_id(prefix),
        app_dir: app.to_path_buf(),
        venv_dir: None,
        entrypoint: vec![PYTHON.into(), "main.py".into()],
        env: vec![("DOCKER_CONTAINER".into(), "1".into())],
        limits: Limits {
            vcpus: 1.0,
            memory_bytes: 256 << 20,
            pids: 64,
        },
        agent_port: 8080,
        session_id: unique_id("session"),
        snapshot: true,
    }
}

pub fn body(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub async fn call(sb: &Sandbox, method: &str, path: &str, data: &str) -> (StatusCode, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body(data.to_string()))
        .unwrap();
    let resp = sb.request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

/// Polls /ping until the agent answers 200; returns how long it took.
pub async fn wait_healthy(sb: &Sandbox) -> Duration {
    let start = Instant::now();
    loop {
        let req = Request::get("/ping").body(body("")).unwrap();
        if let Ok(resp) = sb.request(req).await {
            if resp.status() == StatusCode::OK {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "agent never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs python inside the agent and returns `result` as JSON.
pub async fn run_py(sb: &Sandbox, code: &str) -> serde_json::Value {
    let (status, bytes) = call(sb, "POST", "/run", code).await;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "python failed inside: {}",
        v["error"].as_str().unwrap_or("")
    );
    v["result"].clone()
}

/// `Name:\tvalue` lines of /proc/<pid>/status.
pub fn proc_status(pid: u32) -> Option<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect(),
    )
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

// ---- gvisor substrate helpers (owned by the gvisor tests) ----

pub struct GvisorEnv {
    pub driver: berth_sandbox::gvisor::GvisorDriver,
    pub state: tempfile::TempDir,
    pub cfg: berth_sandbox::gvisor::GvisorConfig,
}

/// A gVisor driver with its own cgroup parent and state dir. Fails (never
/// skips) when runsc is missing.
pub fn gvisor_env() -> GvisorEnv {
    require_host();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let state = tempfile::Builder::new()
        .prefix("berth-gvisor")
        .tempdir()
        .unwrap();
    let mut cfg = berth_sandbox::gvisor::GvisorConfig::new(state.path(), guest_binary());
    cfg.cgroup_name = format!("berth-gvisor-test-{}-{n}", std::process::id());
    cfg.tmp_size_mb = 64;
    let driver = match berth_sandbox::gvisor::GvisorDriver::new(cfg.clone()) {
        Ok(d) => d,
        Err(e) => panic!("gVisor unavailable ({e}); install it with `apt-get install runsc`"),
    };
    GvisorEnv { driver, state, cfg }
}

impl Drop for GvisorEnv {
    fn drop(&mut self) {
        for c in berth_sandbox::process::CONTROLLERS {
            let dir = Path::new(berth_sandbox::process::CGROUP_ROOT)
                .join(c)
                .join(&self.cfg.cgroup_name);
            let _ = std::fs::remove_dir(dir);
        }
    }
}
