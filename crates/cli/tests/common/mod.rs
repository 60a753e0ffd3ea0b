//! Black-box harness: starts the real `berth` binary on 127.0.0.1:0 with a
//! fresh data directory, real sandboxes and the real example agents.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const SESSION_HEADER: &str = "x-amzn-bedrock-agentcore-runtime-session-id";

pub fn berth_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_berth"))
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agents")
}

/// Every server in a test process gets its own cgroup name and uid range,
/// so servers running side by side never sweep or share each other's
/// sandboxes.
fn instance_tag() -> (String, u32) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    (
        format!("berth-test-{pid}-{n}"),
        300_000 + ((pid % 500) * 40 + n % 40) * 200,
    )
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub data: PathBuf,
    pub admin_key: String,
    pub cgroup: String,
    uid_base: u32,
    _dir: Option<tempfile::TempDir>,
    extra: String,
}

impl Server {
    /// A server with test-friendly settings (`min_lifetime_s = 1`, fast pings).
    pub fn start() -> Self {
        Self::start_with("")
    }

    pub fn start_with(extra_config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().to_path_buf();
        let (cgroup, uid_base) = instance_tag();
        let mut s = Self {
            child: spawn_placeholder(),
            url: String::new(),
            data,
            admin_key: String::new(),
            cgroup,
            uid_base,
            _dir: Some(dir),
            extra: extra_config.to_owned(),
        };
        s.boot();
        s.admin_key = s.create_key("acme", "admin", true);
        s
    }

    fn write_config(&self) -> PathBuf {
        // Only the process substrate unless a test asks for more: the
        // others are tested where they are named (substrates.rs).
        let substrates = if self.extra.contains("substrates =") {
            ""
        } else {
            "substrates = [\"process\"]\n"
        };
        let cfg = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmin_lifetime_s = 1\nping_interval_ms = 200\n\
             stop_grace_s = 2\nsandbox_cgroup = \"{}\"\nsandbox_uid_base = {}\nsandbox_uid_count = 200\n{substrates}{}\n",
            self.data.display(),
            self.cgroup,
            self.uid_base,
            self.extra
        );
        let path = self.data.join("berth-test.toml");
        std::fs::write(&path, cfg).expect("write config");
        path
    }

    /// Starts (or restarts) the binary and waits for its listening line.
    pub fn boot(&mut self) {
        let cfg = self.write_config();
        let mut child = Command::new(berth_bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn berth");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            while let Some(Ok(line)) = lines.next() {
                if !sent {
                    if let Some(url) = line.strip_prefix("berth listening on ") {
                        let _ = tx.send(url.to_owned());
                        sent = true;
                    }
                }
            }
        });
        self.url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("berth did not print its listening address within 60 s");
        let old = std::mem::replace(&mut self.child, child);
        drop(old);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait berth")
    }

    pub fn cli(&self) -> Command {
        let mut c = Command::new(berth_bin());
        c.env("BERTH_URL", &self.url)
            .env("BERTH_API_KEY", &self.admin_key)
            .env("RUST_LOG", "warn");
        c
    }

    /// `berth keys create` against the data dir; returns the key.
    pub fn create_key(&self, tenant: &str, user: &str, admin: bool) -> String {
        self.create_key_with_roles(tenant, user, if admin { &["admin"] } else { &[] })
    }

    /// `berth keys create` with these `--role` values; returns the key.
    pub fn create_key_with_roles(&self, tenant: &str, user: &str, roles: &[&str]) -> String {
        let mut c = Command::new(berth_bin());
        c.args([
            "keys",
            "create",
            "--tenant",
            tenant,
            "--user",
            user,
            "--json",
            "--data-dir",
        ])
        .arg(&self.data);
        for role in roles {
            c.args(["--role", role]);
        }
        let out = c.output().expect("run berth keys create");
        assert!(
            out.status.success(),
            "keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("keys json");
        v["key"].as_str().expect("key field").to_owned()
    }

    /// `berth deploy` of an example agent, possibly with its manifest
    /// replaced; returns the deployed version.
    pub fn deploy_example(&self, name: &str, manifest: Option<&str>) -> u64 {
        let src = examples().join(name);
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(&src, dir.path());
        if let Some(m) = manifest {
            std::fs::write(dir.path().join("berth.toml"), m).expect("write manifest");
        }
        let out = self
            .cli()
            .args(["deploy", "--json"])
            .arg(dir.path())
            .output()
            .expect("run berth deploy");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "deploy failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout
            .lines()
            .rev()
            .find(|l| l.contains("\"version\""))
            .expect("version line");
        let v: serde_json::Value = serde_json::from_str(last).expect("deploy json");
        v["version"]["version"].as_u64().expect("version number")
    }

    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()
            .expect("client")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

fn spawn_placeholder() -> Child {
    Command::new("true").spawn().expect("spawn true")
}

pub fn copy_dir(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).expect("read example") {
        let entry = entry.expect("entry");
        let to = dst.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            std::fs::create_dir_all(&to).expect("mkdir");
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

pub fn sid(tag: &str) -> String {
    format!("{tag}-{}", uuid_like())
}

pub fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{t:032x}-{:08x}-{:06}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// POSTs a JSON payload to an agent with a session id and an API key.
pub async fn invoke(
    c: &reqwest::Client,
    s: &Server,
    key: &str,
    agent: &str,
    session: &str,
    payload: serde_json::Value,
) -> reqwest::Response {
    c.post(format!("{}/v1/agents/{agent}/invocations", s.url))
        .bearer_auth(key)
        .header(SESSION_HEADER, session)
        .json(&payload)
        .send()
        .await
        .expect("send invocation")
}

pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// GET `path` on the server with `key` and parse the JSON answer.
pub async fn get_json(c: &reqwest::Client, s: &Server, key: &str, path: &str) -> serde_json::Value {
    c.get(format!("{}{path}", s.url))
        .bearer_auth(key)
        .send()
        .await
        .expect("send GET")
        .json()
        .await
        .expect("JSON answer")
}
