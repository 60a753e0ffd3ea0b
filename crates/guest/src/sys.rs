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
