//! One QEMU process: its command line, its start (unprivileged, in its
//! cgroups, under QEMU's own seccomp sandbox), its console and its exit.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use berth_guest::proto::{VM_EXIT_PREFIX, VM_PARKED_LINE};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

use super::{Accel, MicrovmConfig};
use crate::DriverError;

/// The descriptor number QEMU finds the template memory on.
const MEM_FD: RawFd = 3;

/// How the guest's RAM is backed.
pub(crate) enum Memory<'a> {
    /// Anonymous memory (a VM that is never snapshotted).
    Private,
    /// A template being built: RAM is the shared memfd, which keeps it.
    TemplateSource(&'a OwnedFd),
    /// A clone: the template's sealed memfd, mapped private (copy on write).
    Clone(&'a OwnedFd),
}

/// Everything one QEMU start needs.
pub(crate) struct Launch<'a> {
    pub id: &'a str,
    /// The VM's private directory (sockets), owned by `uid`.
    pub dir: &'a Path,
    pub uid: u32,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mb: u64,
    /// Base image (the guest's `/`) and version image, in this order.
    pub disks: [&'a Path; 2],
    pub memory: Memory<'a>,
    /// Wait for the state on `-incoming defer`.
    pub incoming: bool,
    /// `cgroup.procs` files QEMU joins before it execs.
    pub cgroup_procs: &'a [PathBuf],
}

impl Launch<'_> {
    pub(crate) fn qmp_path(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub(crate) fn agent_path(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
}

/// QEMU's option values are comma-separated; a comma in a path is doubled.
fn q(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The kernel command line: the base image is the read-only root and
/// berth-guest its init.
pub(crate) fn kernel_cmdline() -> &'static str {
    "console=ttyS0 reboot=t panic=-1 quiet random.trust_cpu=on tsc=reliable \
     root=/dev/vda ro rootfstype=ext4 init=/sbin/berth-guest"
}

pub(crate) fn args(cfg: &MicrovmConfig, l: &Launch<'_>) -> Vec<String> {
    let mut machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=off".to_string();
    if !matches!(l.memory, Memory::Private) {
        machine.push_str(",memory-backend=mem");
    }
    let mut a: Vec<String> = vec!["-M".into(), machine];
    match l.accel {
        Accel::Kvm => a.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]),
        _ => a.extend([
            "-accel".into(),
            format!("tcg,tb-size={}", cfg.tb_size_mb),
            "-cpu".into(),
            "max".into(),
        ]),
    }
    a.extend([
        "-smp".into(),
        l.vcpus.to_string(),
        "-m".into(),
        format!("{}M", l.memory_mb),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-serial".into(),
        "stdio".into(),
        "-kernel".into(),
        cfg.kernel.display().to_string(),
        "-append".into(),
        kernel_cmdline().into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", q(&l.qmp_path())),
    ]);
    for (name, disk) in ["base", "version"].iter().zip(l.disks) {
        a.extend([
            "-drive".into(),
            format!("file={},format=raw,if=none,readonly=on,id={name}", q(disk)),
            "-device".into(),
            format!("virtio-blk-device,drive={name}"),
        ]);
    }
    a.extend([
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=ag,path={},server=on,wait=off",
            q(&l.agent_path())
        ),
        "-device".into(),
        "virtserialport,chardev=ag,name=berth.0,nr=1".into(),
    ]);
    let share = match l.memory {
        Memory::Private => None,
        Memory::TemplateSource(_) => Some("on"),
        Memory::Clone(_) => Some("off"),
    };
    if let Some(share) = share {
        a.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={}M,mem-path=/proc/self/fd/{MEM_FD},share={share}",
                l.memory_mb
            ),
        ]);
    }
    if l.incoming {
        a.extend(["-incoming".into(), "defer".into()]);
    }
    a
}

/// A started QEMU: its pid, and what its console and exit tell.
pub(crate) struct Vmm {
    pub pid: u32,
    pub exited: watch::Receiver<bool>,
    /// The agent's exit code from the console, or the QEMU's own end.
    pub exit_code: Arc<Mutex<Option<i32>>>,
    /// Counts `parked` lines on the console (the guest went back to
    /// waiting for a hello after the host hung up).
    #[allow(dead_code)]
    pub parked: watch::Receiver<u64>,
    /// The last line QEMU wrote on stderr (why it failed).
    pub last_error: Arc<Mutex<String>>,
}

/// Starts QEMU as `uid` in its cgroups; the memfd (if any) on fd 3.
pub(crate) fn spawn(cfg: &MicrovmConfig, l: &Launch<'_>) -> Result<Vmm, DriverError> {
    let procs: Vec<std::fs::File> = l
        .cgroup_procs
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map_err(DriverError::io("open", p))
        })
        .collect::<Result<_, _>>()?;
    let proc_fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
    let mem_fd = match l.memory {
        Memory::Private => None,
        Memory::TemplateSource(fd) | Memory::Clone(fd) => Some(fd.as_raw_fd()),
    };
    let uid = l.uid;
    let mut cmd = std::process::Command::new(&cfg.qemu);
    cmd.args(args(cfg, l))
        .env_clear()
        .current_dir(l.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (write, dup2, fcntl, setsid, setgroups,
    // setresgid, setresuid) on integers and static data; it allocates
    // nothing (io::Error::last_os_error stores the errno inline).
    unsafe {
        cmd.pre_exec(move || {
            for fd in &proc_fds {
                // "0" moves the writing process: QEMU is in its cgroups
                // before it allocates anything.
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = mem_fd {
                let rc = if fd == MEM_FD {
                    libc::fcntl(MEM_FD, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, MEM_FD)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| DriverError::Vmm(format!("spawn {}: {e}", cfg.qemu.display())))?;
    drop(procs);
    let pid = child
        .id()
        .ok_or_else(|| DriverError::Vmm("QEMU exited at once".into()))?;
    let exit_code = Arc::new(Mutex::new(None));
    let (parked_tx, parked) = watch::channel(0u64);
    let last_error = Arc::new(Mutex::new(String::new()));
    if let Some(out) = child.stdout.take() {
        let console = Console {
            id: l.id.to_string(),
            exit_code: exit_code.clone(),
            parked: parked_tx,
            max_line: cfg.max_console_line,
        };
        tokio::spawn(console.read(out));
    }
    if let Some(err) = child.stderr.take() {
        let id = l.id.to_string();
        tokio::spawn(read_stderr(
            err,
            id,
            last_error.clone(),
            cfg.max_console_line,
        ));
    }
    let (exited_tx, exited) = watch::channel(false);
    let code = exit_code.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        tracing::debug!(?status, "qemu reaped");
        // No exit line: the VM ended without its agent ending (killed).
        let mut code = code.lock().unwrap_or_else(|p| p.into_inner());
        if code.is_none() {
            *code = Some(137);
        }
        drop(code);
        let _ = exited_tx.send(true);
    });
    Ok(Vmm {
        pid,
        exited,
        exit_code,
        parked,
        last_error,
    })
}

/// The guest's serial console: agent output, the exit line, parked lines.
struct Console {
    id: String,
    exit_code: Arc<Mutex<Option<i32>>>,
    parked: watch::Sender<u64>,
    max_line: usize,
}

impl Console {
    async fn read(self, out: impl AsyncRead + Unpin) {
        let mut reader = BufReader::new(out);
        while let Some(line) = read_line(&mut reader, self.max_line).await {
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(code) = line.strip_prefix(VM_EXIT_PREFIX) {
                if let Ok(code) = code.trim().parse::<i32>() {
                    *self.exit_code.lock().unwrap_or_else(|p| p.into_inner()) = Some(code);
                }
            } else if line == VM_PARKED_LINE {
                self.parked.send_modify(|n| *n += 1);
            } else if !line.is_empty() {
                tracing::info!(target: "berth::agent", sandbox = %self.id, stream = "console", "{line}");
            }
        }
    }
}

async fn read_stderr(
    err: impl AsyncRead + Unpin,
    id: String,
    last: Arc<Mutex<String>>,
    max: usize,
) {
    let mut reader = BufReader::new(err);
    while let Some(line) = read_line(&mut reader, max).await {
        let line = line.trim_end().to_string();
        if !line.is_empty() {
            tracing::warn!(sandbox = %id, "qemu: {line}");
            *last.lock().unwrap_or_else(|p| p.into_inner()) = line;
        }
    }
}

/// One line, cut at `max` bytes (the rest of a longer line comes as the
/// next lines); None at EOF.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>, max: usize) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().await.ok()?;
        if buf.is_empty() {
            return (!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned());
        }
        let room = max.saturating_sub(line.len()).max(1);
        let take = buf.len().min(room);
        let (n, done) = match buf[..take].iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (take, line.len() + take >= max),
        };
        line.extend_from_slice(&buf[..n]);
        r.consume(n);
        if done {
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
    }
}
