//! The few calls that need `unsafe`: fork, raw descriptors, and one ioctl.
//! Everything else in the guest goes through nix's safe wrappers.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::unistd::ForkResult;

use crate::proto::CHANNEL_FD;

/// Forks the (single-threaded) setup process.
pub fn fork() -> Result<ForkResult, Errno> {
    // SAFETY: the guest is single-threaded during setup (no runtime has been
    // built yet), so the child may run arbitrary code after fork.
    unsafe { nix::unistd::fork() }
}

/// Closes every descriptor from `first` upwards.
pub fn close_from(first: u32) -> Result<(), Errno> {
    // SAFETY: close_range only closes descriptors; the guest owns none above
    // `first` that any Rust object still refers to (called first thing in main).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    Errno::result(rc).map(drop)
}

/// Writes `bytes` to the channel before it is turned into a stream.
pub fn write_channel(bytes: &[u8]) -> Result<(), Errno> {
    // SAFETY: fd 3 is the channel the host passed us; it stays open for the
    // whole process lifetime and the borrow does not outlive this call.
    let fd = unsafe { BorrowedFd::borrow_raw(CHANNEL_FD) };
    let mut rest = bytes;
    while !rest.is_empty() {
        match nix::unistd::write(fd, rest) {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Takes ownership of the channel descriptor as a stream.
pub fn channel_stream() -> UnixStream {
    // SAFETY: fd 3 is a connected unix socket from the host's socketpair
    // (checked by the host before spawning); we take ownership exactly once.
    unsafe { UnixStream::from_raw_fd(CHANNEL_FD) }
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> Result<(), Errno> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface named in `req` and fills
    // ifru_flags; `req` is a valid, writable ifreq for the whole call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(rc)?;
    // SAFETY: after SIOCGIFFLAGS the flags member is the active union field.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(rc).map(drop)
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`) from linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`) from linux/random.h.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `seed` into the kernel's input pool with full entropy credit, then
/// forces the CRNG to reseed from it, so that every later read of the RNG
/// depends on `seed` (a restored snapshot must not repeat its template's
/// random stream). Needs CAP_SYS_ADMIN.
pub fn add_entropy(seed: &[u8]) -> Result<(), Errno> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let bytes = i32::try_from(seed.len()).map_err(|_| Errno::EINVAL)?;
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&(bytes.saturating_mul(8)).to_ne_bytes());
    info.extend_from_slice(&bytes.to_ne_bytes());
    info.extend_from_slice(seed);
    // SAFETY: `info` is a valid rand_pool_info: two ints followed by
    // buf_size bytes; the kernel only reads it during the call.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    Errno::result(rc)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG, 0) };
    Errno::result(rc).map(drop)
}

/// Sets CLOCK_REALTIME (a restored snapshot wakes up with its template's time).
pub fn set_realtime(secs: i64, nanos: u32) -> Result<(), Errno> {
    if nanos >= 1_000_000_000 {
        return Err(Errno::EINVAL);
    }
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    Errno::result(rc).map(drop)
}

/// Restarts the machine; under QEMU's `-no-reboot` this ends the VM.
pub fn reboot() -> ! {
    // SAFETY: reboot takes no pointers; on success it does not return.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Only reached without CAP_SYS_BOOT, i.e. not as the VM's init.
    std::process::exit(1)
}

/// Confines the agent `cmd` will start (after std switched to its uid and
/// gid): RLIMIT_NOFILE, RLIMIT_NPROC for its uid, no core dumps,
/// no_new_privs and the seccomp `programs`.
pub fn confine_agent(
    cmd: &mut std::process::Command,
    nofile: u64,
    nproc: u64,
    programs: Vec<seccompiler::BpfProgram>,
) {
    use std::os::unix::process::CommandExt as _;
    let limits = [
        (libc::RLIMIT_NOFILE, nofile),
        (libc::RLIMIT_NPROC, nproc),
        (libc::RLIMIT_CORE, 0),
    ];
    // SAFETY: the closure runs between fork and exec; it only calls
    // setrlimit, prctl and seccomp (through seccompiler::apply_filter, which
    // builds a sock_fprog on the stack from the already compiled programs
    // and allocates only on its error path, after which exec is abandoned).
    unsafe {
        cmd.pre_exec(move || {
            for (resource, value) in limits {
                let rl = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for program in &programs {
                seccompiler::apply_filter(program)
                    .map_err(|_| std::io::Error::from_raw_os_error(libc::EPERM))?;
            }
            Ok(())
        });
    }
}

/// Registers `fd` with the runtime's reactor.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that only it closes, and
    // its as_raw_fd always returns the same number; the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}
