//! berth-guest as the init (pid 1) of a microVM.
//!
//! The kernel starts it from the read-only base image. It mounts the
//! pseudo filesystems and the version image, then waits on the virtio-serial
//! port for the host's hello line ([`VmHello`]): fresh entropy, the wall
//! clock and the session, applied before it answers `ready <nonce>`. The
//! first hello also names the agent, which starts then (unprivileged,
//! no_new_privs, seccomp). After the ready line the port speaks HTTP/2 (the
//! same service as the process substrate) until the host hangs up, and the
//! guest goes back to waiting for a hello: a template VM is snapshotted in
//! that state, and every clone restored from it gets its own hello.
//! When the agent ends, the guest prints `berth-guest: exit <code>` on the
//! console and reboots, which ends QEMU (`-no-reboot`).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::mount::MsFlags;
use nix::unistd::{chown, Gid, Uid};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::proto::{
    VmAgentSpec, VmHello, VM_EXIT_PREFIX, VM_MAX_HELLO, VM_PARKED_LINE, VM_PORT_NAME,
    VM_READY_PREFIX,
};
use crate::serve::{self, Shared, Signals};
use crate::setup::{mkdirs, mount_at};
use crate::{seccomp, sys};

/// Pause between reads while no host is connected (the port reads EOF).
const NO_HOST_RETRY: Duration = Duration::from_millis(2);
/// How long the guest waits for its port to appear at boot.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// Where the version image is mounted.
const VERSION_DIR: &str = "/mnt/version";
/// The version image's block device (the base image is `/dev/vda`, `/`).
const VERSION_DEVICE: &str = "/dev/vdb";

/// True when this process is the init of a VM: pid 1 without a
/// subcommand (`setup` and `oci` may run as pid 1 of a namespace).
pub fn is_vm_init(args: &[String]) -> bool {
    std::process::id() == 1 && !matches!(args.get(1).map(String::as_str), Some("setup" | "oci"))
}

/// Runs the VM's init; never returns (the machine reboots, i.e. stops).
pub fn run() -> ! {
    if let Err((stage, e)) = init() {
        println!("berth-guest: init failed at {stage}: {e}");
        println!("{VM_EXIT_PREFIX}125");
        sys::reboot();
    }
    let code = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(channel_loop()),
        Err(e) => {
            println!("berth-guest: runtime: {e}");
            70
        }
    };
    println!("{VM_EXIT_PREFIX}{code}");
    sys::reboot()
}

type Stage = (&'static str, nix::errno::Errno);

fn at(stage: &'static str) -> impl FnOnce(nix::errno::Errno) -> Stage {
    move |e| (stage, e)
}

fn io_at(stage: &'static str) -> impl FnOnce(io::Error) -> Stage {
    move |e| {
        let errno = nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        (stage, errno)
    }
}

/// Pseudo filesystems, the version image, loopback and hostname.
fn init() -> Result<(), Stage> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let noexec = nosuid | MsFlags::MS_NOEXEC;
    mount_at(None, Path::new("/proc"), Some("proc"), noexec, None).map_err(at("mount-proc"))?;
    let dev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    match mount_at(None, Path::new("/dev"), Some("devtmpfs"), dev, None) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => return Err(("mount-dev", e)),
    }
    let tmp = Some("mode=1777");
    mount_at(None, Path::new("/tmp"), Some("tmpfs"), nosuid, tmp).map_err(at("mount-tmp"))?;
    let run = Some("mode=0755");
    mount_at(None, Path::new("/run"), Some("tmpfs"), nosuid, run).map_err(at("mount-run"))?;
    mkdirs(Path::new("/dev/shm")).map_err(io_at("mkdir-shm"))?;
    mount_at(None, Path::new("/dev/shm"), Some("tmpfs"), noexec, tmp).map_err(at("mount-shm"))?;
    let ro = nosuid | MsFlags::MS_RDONLY;
    let version = Some(Path::new(VERSION_DEVICE));
    mount_at(version, Path::new(VERSION_DIR), Some("ext4"), ro, None)
        .map_err(at("mount-version"))?;
    sys::loopback_up().map_err(at("loopback"))?;
    nix::unistd::sethostname("berth").map_err(at("hostname"))?;
    // The agent (another uid) cannot inspect or signal-probe pid 1's memory.
    nix::sys::prctl::set_dumpable(false).map_err(at("dumpable"))
}

/// `/app` as an overlay over the version's app with a writable layer in
/// guest RAM owned by the agent, and the version's venv at `/venv`.
fn mount_agent_dirs(spec: &VmAgentSpec) -> Result<bool, Stage> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let layer = Path::new("/run/app");
    mkdirs(layer).map_err(io_at("mkdir-layer"))?;
    let mode = Some("mode=0755");
    mount_at(None, layer, Some("tmpfs"), nosuid, mode).map_err(at("mount-layer"))?;
    let (upper, work) = (layer.join("upper"), layer.join("work"));
    mkdirs(&upper).map_err(io_at("mkdir-upper"))?;
    mkdirs(&work).map_err(io_at("mkdir-work"))?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    chown(&upper, Some(uid), Some(gid)).map_err(at("chown-upper"))?;
    let opts = format!(
        "lowerdir={VERSION_DIR}/app,upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let overlay = Some(Path::new("overlay"));
    mount_at(
        overlay,
        Path::new("/app"),
        Some("overlay"),
        nosuid,
        Some(&opts),
    )
    .map_err(at("mount-app"))?;
    let venv = Path::new(VERSION_DIR).join("venv");
    if !venv.is_dir() {
        return Ok(false);
    }
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount_at(Some(&venv), Path::new("/venv"), None, bind, None).map_err(at("bind-venv"))?;
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid;
    mount_at(None, Path::new("/venv"), None, ro, None).map_err(at("remount-venv"))?;
    Ok(true)
}

fn start_agent(spec: &VmAgentSpec, signals: Signals) -> Result<Arc<Shared>, String> {
    let venv = mount_agent_dirs(spec).map_err(|(stage, e)| format!("{stage}: {e}"))?;
    let programs = seccomp::programs().map_err(|e| format!("seccomp: {e}"))?;
    let mut cmd = serve::agent_command(&spec.entrypoint, &spec.env, venv)
        .map_err(|e| format!("entrypoint: {e}"))?;
    {
        use std::os::unix::process::CommandExt as _;
        cmd.uid(spec.uid).gid(spec.gid);
    }
    sys::confine_agent(&mut cmd, spec.nofile, spec.nproc, programs);
    let pid = serve::spawn(&mut cmd).map_err(|e| format!("spawn {:?}: {e}", spec.entrypoint))?;
    Ok(Shared::start(signals, pid, spec.agent_port))
}

/// Applies what a hello carries, before the guest answers it.
fn apply(hello: &VmHello) -> Result<(), String> {
    if hello.seed.len() < 32 {
        return Err("hello seed shorter than 32 bytes".into());
    }
    sys::add_entropy(&hello.seed).map_err(|e| format!("entropy: {e}"))?;
    sys::set_realtime(hello.time_secs, hello.time_nanos).map_err(|e| format!("clock: {e}"))?;
    let dir = Path::new("/run/berth");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| format!("session dir: {e}"))?;
    fs::write(dir.join("session_id"), &hello.session_id).map_err(|e| format!("session: {e}"))
}

async fn channel_loop() -> i32 {
    let mut signals = match Signals::install() {
        Ok(s) => Some(s),
        Err(e) => {
            println!("berth-guest: signal handlers: {e}");
            return 70;
        }
    };
    let port = match open_port().await {
        Ok(p) => Arc::new(p),
        Err(e) => {
            println!("berth-guest: port {VM_PORT_NAME}: {e}");
            return 70;
        }
    };
    let mut agent: Option<Arc<Shared>> = None;
    loop {
        let hello = match &agent {
            None => read_hello(&port).await,
            Some(shared) => {
                let mut status = shared.status();
                tokio::select! {
                    h = read_hello(&port) => h,
                    _ = status.wait_for(|s| !s.running) => break,
                }
            }
        };
        if let Err(e) = apply(&hello) {
            println!("berth-guest: hello refused: {e}");
            return 125;
        }
        if agent.is_none() {
            let (Some(spec), Some(signals)) = (&hello.agent, signals.take()) else {
                println!("berth-guest: the first hello names no agent");
                return 125;
            };
            match start_agent(spec, signals) {
                Ok(shared) => agent = Some(shared),
                Err(e) => {
                    println!("berth-guest: cannot start agent: {e}");
                    return 127;
                }
            }
        }
        let Some(shared) = agent.clone() else {
            return 70;
        };
        if let Some(ms) = hello.park_after_ping_ms {
            wait_ping(&shared, Duration::from_millis(ms)).await;
        }
        let ready = format!("{VM_READY_PREFIX}{}\n", hello.nonce);
        let mut conn = PortConn::new(port.clone());
        if conn.write_all(ready.as_bytes()).await.is_err() || hello.park_after_ping_ms.is_some() {
            continue;
        }
        if serve_until_end(conn, &shared).await {
            break;
        }
        println!("{VM_PARKED_LINE}");
    }
    match &agent {
        Some(shared) => serve::exit_code(&shared.status().borrow()),
        None => 70,
    }
}

/// Polls the agent's /ping until 200 or `timeout` (the host then sees
/// the template fail its own check).
async fn wait_ping(shared: &Shared, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !shared.ping().await && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves HTTP/2 until the host hangs up (false) or the agent ended (true).
async fn serve_until_end(conn: PortConn, shared: &Arc<Shared>) -> bool {
    let mut status = shared.status();
    let mut task = tokio::spawn(serve::serve_channel(conn, shared.clone()));
    tokio::select! {
        _ = &mut task => return false,
        _ = status.wait_for(|s| !s.running) => {}
    }
    // Let the host read the final status unless it asked for the end.
    if !shared.shutting_down() {
        let _ = tokio::time::timeout(serve::LINGER, &mut task).await;
    }
    task.abort();
    true
}

/// Finds `/dev/vportNpM` whose name is [`VM_PORT_NAME`] and opens it.
async fn open_port() -> io::Result<Port> {
    let deadline = tokio::time::Instant::now() + PORT_WAIT;
    loop {
        if let Some(path) = find_port() {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)?;
            return Ok(Port(sys::async_fd(OwnedFd::from(file))?));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(io::ErrorKind::NotFound.into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Looks the port up in sysfs, mounted for the moment under /run (the
/// base image has no /sys, and the agent needs none).
fn find_port() -> Option<PathBuf> {
    let sys = Path::new("/run/sys");
    mkdirs(sys).ok()?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    mount_at(None, sys, Some("sysfs"), flags, None).ok()?;
    let found = fs::read_dir(sys.join("class/virtio-ports"))
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .find(|e| {
                    fs::read_to_string(e.path().join("name"))
                        .is_ok_and(|n| n.trim() == VM_PORT_NAME)
                })
                .map(|e| Path::new("/dev").join(e.file_name()))
        });
    let _ = nix::mount::umount2(sys, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(sys);
    found
}

/// Reads lines until one is a valid hello. EOF means no host is connected
/// (yet, or any more): wait and read again. Anything else is discarded: a
/// restored guest may see bytes meant for an older connection.
async fn read_hello(port: &Arc<Port>) -> VmHello {
    let mut conn = PortConn::raw(port.clone());
    let mut line = Vec::new();
    let mut discarding = false;
    // One byte at a time: whatever follows the hello's newline (a resent
    // hello, then the HTTP/2 preface) belongs to the connection, and a
    // larger read would swallow its start.
    let mut buf = [0u8; 1];
    loop {
        let n = match std::future::poll_fn(|cx| conn.poll_read_raw(cx, &mut buf)).await {
            Ok(0) | Err(_) => {
                line.clear();
                discarding = false;
                tokio::time::sleep(NO_HOST_RETRY).await;
                continue;
            }
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' {
                if !discarding {
                    if let Ok(hello) = serde_json::from_slice::<VmHello>(&line) {
                        return hello;
                    }
                }
                line.clear();
                discarding = false;
            } else if line.len() >= VM_MAX_HELLO {
                line.clear();
                discarding = true;
            } else if !discarding {
                line.push(b);
            }
        }
    }
}

/// The virtio-serial port, non-blocking, driven by the runtime's epoll.
struct Port(AsyncFd<OwnedFd>);

/// Where a connection is in skipping stale hello lines.
#[derive(Clone, Copy, PartialEq)]
enum Skip {
    /// At the start of a line: a `{` starts a hello resent by the host.
    LineStart,
    /// Inside a resent hello line, until its newline.
    Line,
    /// HTTP/2 has started: everything passes.
    Off,
}

/// One connection's view of the port. A host that resent its hello before
/// the ready line arrived has extra hello lines queued ahead of its HTTP/2
/// preface (which starts with `P`); they are dropped here.
struct PortConn {
    port: Arc<Port>,
    skip: Skip,
}

impl PortConn {
    fn new(port: Arc<Port>) -> Self {
        PortConn {
            port,
            skip: Skip::LineStart,
        }
    }

    fn raw(port: Arc<Port>) -> Self {
        PortConn {
            port,
            skip: Skip::Off,
        }
    }

    fn poll_read_raw(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.port.0.poll_read_ready(cx))?;
            let result =
                guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from));
            match result {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    /// Drops skipped bytes from the front of `data`; returns where the
    /// bytes to keep start.
    fn filter(&mut self, data: &[u8]) -> usize {
        for (i, &b) in data.iter().enumerate() {
            match self.skip {
                Skip::Off => return i,
                Skip::LineStart if b == b'{' => self.skip = Skip::Line,
                Skip::LineStart => {
                    self.skip = Skip::Off;
                    return i;
                }
                Skip::Line if b == b'\n' => self.skip = Skip::LineStart,
                Skip::Line => {}
            }
        }
        data.len()
    }
}

impl AsyncRead for PortConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let unfilled = buf.initialize_unfilled();
            let n = ready!(this.poll_read_raw(cx, unfilled))?;
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            let start = this.filter(&unfilled[..n]);
            if start < n {
                unfilled.copy_within(start..n, 0);
                buf.advance(n - start);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for PortConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.port.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd, data).map_err(io::Error::from)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resent_hellos_are_skipped_before_the_preface() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let port = Arc::new(Port(sys::async_fd(OwnedFd::from(a)).unwrap()));
            let mut conn = PortConn::new(port);
            let data = b"{\"nonce\":1}\n{\"nonce\":2}\nPRI * HTTP/2.0{";
            let start = conn.filter(data);
            assert_eq!(&data[start..], b"PRI * HTTP/2.0{");
            assert_eq!(conn.filter(b"{x\n"), 0);
        });
    }
}
