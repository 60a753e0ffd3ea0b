//! Spawning the guest with its end of the channel on fd 3.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// Starts `guest setup <spec>` as root with `channel` as fd 3, stdin from
/// /dev/null and stdout/stderr piped.
pub fn spawn_guest(binary: &Path, spec: &Path, channel: OwnedFd) -> std::io::Result<Child> {
    let fd = channel.as_raw_fd();
    let mut cmd = std::process::Command::new(binary);
    cmd.arg("setup")
        .arg(spec)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl, setsid) on plain integers; it
    // allocates nothing (io::Error::last_os_error stores an errno inline).
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                // dup2 onto itself would keep CLOEXEC set; clear it instead.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Own session: terminal signals aimed at berth do not reach it.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Command::from(cmd).kill_on_drop(false).spawn();
    // The guest has its copy now; ours must close so EOF means "guest gone".
    drop(channel);
    child
}

/// Forwards one output stream of the guest into tracing, in bounded chunks,
/// until it closes. Never buffers more than `max_chunk` bytes.
pub async fn drain<R>(mut stream: R, sandbox: String, name: &'static str, max_chunk: usize)
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut buf = vec![0u8; max_chunk.max(1)];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                for line in text.lines().filter(|l| !l.is_empty()) {
                    tracing::info!(target: "berth::agent", sandbox = %sandbox, stream = name, "{line}");
                }
            }
        }
    }
}
