//! berth-guest: the small program that runs inside every sandbox.
//!
//! Started by the host as `berth-guest setup <spec.json>` with the channel on
//! fd 3. It builds the sandbox (cgroups, namespaces, root filesystem,
//! privileges, seccomp), reports `ok` on the channel, starts the agent as a
//! child of pid 1, and then serves HTTP/2 on the channel: `/_berth/status`,
//! `/_berth/shutdown`, and everything else relayed to the agent.
#![deny(unsafe_code)]

mod oci;
pub mod proto;
mod rootfs;
mod seccomp;
mod serve;
mod setup;
mod sys;
mod vm;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::{fstat, SFlag};

use proto::{GuestSpec, CHANNEL_FD, READY_LINE};
use setup::{fail, At, Fail};

/// Entry point of the `berth-guest` executable.
pub fn main() -> ! {
    let args: Vec<String> = std::env::args().collect();
    if vm::is_vm_init(&args) {
        vm::run()
    }
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("setup"), Some(spec)) if args.len() == 3 => run(spec),
        (Some("oci"), Some(spec)) if args.len() == 3 => oci::run(spec),
        _ => {
            eprintln!("usage: berth-guest setup <spec.json>   (started by berth, channel on fd 3)");
            std::process::exit(2)
        }
    }
}

fn run(spec_path: &str) -> ! {
    if let Err(e) = check_channel() {
        eprintln!("berth-guest: fd {CHANNEL_FD} is not the host channel: {e}");
        std::process::exit(2);
    }
    let spec = match read_spec(spec_path) {
        Ok(spec) => spec,
        Err(f) => fail(f),
    };
    if let Err(f) = setup::enter_namespaces(&spec).and_then(|()| setup::build_sandbox(&spec)) {
        fail(f);
    }
    if let Err(errno) = sys::write_channel(format!("{READY_LINE}\n").as_bytes()) {
        eprintln!("berth-guest: cannot report ready: {errno}");
        std::process::exit(125);
    }
    std::process::exit(serve::run(&spec))
}

/// The channel must be a socket; it is kept out of every exec (CLOEXEC),
/// and every other descriptor above stderr is closed.
fn check_channel() -> Result<(), nix::errno::Errno> {
    let st = fstat(CHANNEL_FD)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(nix::errno::Errno::ENOTSOCK);
    }
    fcntl(CHANNEL_FD, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    sys::close_from(CHANNEL_FD as u32 + 1)
}

fn read_spec(path: &str) -> Result<GuestSpec, Fail> {
    let bytes = std::fs::read(path).at("read-spec")?;
    serde_json::from_slice(&bytes).map_err(|_| Fail {
        stage: "parse-spec",
        errno: nix::errno::Errno::EINVAL,
    })
}
