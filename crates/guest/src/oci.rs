//! `berth-guest oci <spec.json>`: the guest inside an OCI runtime (gVisor).
//!
//! The runtime already built the namespaces and the root filesystem from the
//! bundle, so this mode skips that half of `setup`. The host hands the
//! channel over as stdin (runsc gives its own stdio to the container's first
//! process); it moves to fd 3 so the rest of the guest finds it where it
//! always does. The process starts as uid 0 of the runtime's own kernel (not
//! of the host) with just the capabilities to make `/app` the agent's and
//! to change uid, and gives all of them up before it reports ready.

use std::path::Path;

use nix::fcntl::{open, OFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::unistd::{chown, dup3, Gid, Uid};

use crate::proto::{CHANNEL_FD, READY_LINE};
use crate::setup::{self, fail, At, Fail};
use crate::{serve, sys};

/// Runs the guest inside an OCI container; never returns.
pub fn run(spec_path: &str) -> ! {
    if let Err(e) = take_channel_from_stdin() {
        eprintln!("berth-guest: stdin is not the host channel: {e}");
        std::process::exit(2);
    }
    let spec = match crate::read_spec(spec_path) {
        Ok(spec) => spec,
        Err(f) => fail(f),
    };
    if let Err(f) = prepare(&spec) {
        fail(f);
    }
    if let Err(errno) = sys::write_channel(format!("{READY_LINE}\n").as_bytes()) {
        eprintln!("berth-guest: cannot report ready: {errno}");
        std::process::exit(125);
    }
    std::process::exit(serve::run(&spec))
}

/// fd 0 becomes fd 3 (close-on-exec), fd 0 reads /dev/null, and every
/// other descriptor above stderr is closed. This gVisor refuses
/// `close_range` (EINVAL), so the descriptors are closed one by one from
/// the list in /proc/self/fd.
fn take_channel_from_stdin() -> Result<(), nix::errno::Errno> {
    let st = fstat(0)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(nix::errno::Errno::ENOTSOCK);
    }
    dup3(0, CHANNEL_FD, OFlag::O_CLOEXEC)?;
    let null = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    if null != 0 {
        dup3(null, 0, OFlag::empty())?;
        nix::unistd::close(null)?;
    }
    let others: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|_| nix::errno::Errno::EBADF)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > CHANNEL_FD)
        .collect();
    for fd in others {
        // The directory's own descriptor is in the list and already closed.
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// `/app` (the runtime's private in-memory overlay) becomes the agent's,
/// as the process substrate's overlay upper layer is; then the agent's
/// limits, identity and filter.
fn prepare(spec: &crate::proto::GuestSpec) -> Result<(), Fail> {
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    chown(Path::new("/app"), Some(uid), Some(gid)).at("chown-app")?;
    std::env::set_current_dir("/app").at("chdir-app")?;
    setup::set_rlimits(spec)?;
    setup::drop_privileges(spec)?;
    setup::lock_down()
}
