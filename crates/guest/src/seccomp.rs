//! The sandbox's seccomp filter: allow by default, refuse a list of calls that
//! only serve to attack the kernel or escape the sandbox.
//!
//! Default-allow keeps every ordinary program (Python, Node, native wheels)
//! working; the deny list covers the kernel surfaces that have produced most
//! container escapes and that no agent needs. Refused calls fail with EPERM
//! instead of killing the process so that programs probing for features
//! (io_uring, userfaultfd) fall back gracefully.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// Calls refused outright, with the reason for each group.
const DENIED: &[libc::c_long] = &[
    // Inspecting or writing other processes' memory (a sibling, the guest).
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    // Changing the filesystem view or namespaces after setup.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    // Large kernel attack surfaces that agents do not need.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_lookup_dcookie,
    // Host-wide state: kernel, modules, clocks, swap, accounting, logs.
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_quotactl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
];

/// clone flags that create namespaces. Refused so a process cannot build a
/// user namespace (and gain capabilities inside it) or any other namespace.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Arguments 0..=5 and these operators are always valid; a failure here
    // is a programming error caught by the unit test below.
    #[allow(clippy::expect_used)]
    SeccompCondition::new(arg, len, op, value).expect("valid seccomp condition")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    // Non-empty condition lists are always valid (see the unit test).
    #[allow(clippy::expect_used)]
    SeccompRule::new(conditions).expect("valid seccomp rule")
}

fn deny_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // clone's first argument is the flag word on x86_64 and aarch64.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let op = SeccompCmpOp::MaskedEq(flag);
            rule(vec![cond(0, SeccompCmpArgLen::Qword, op, flag)])
        })
        .collect();
    rules.insert(libc::SYS_clone, clone_rules);
    // personality: only the query (0xffffffff) and the default (0) are
    // allowed; other personas disable ASLR or change the syscall ABI.
    rules.insert(
        libc::SYS_personality,
        vec![rule(vec![
            cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, 0),
            cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, 0xffff_ffff),
        ])],
    );
    // TIOCSTI injects input into a terminal; the agent has none, but a
    // terminal could be reachable through an inherited descriptor.
    rules.insert(
        libc::SYS_ioctl,
        vec![rule(vec![cond(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::TIOCSTI,
        )])],
    );
    rules
}

/// The two programs: EPERM for the deny list; ENOSYS for clone3, whose flags
/// live in memory a filter cannot read, so libc falls back to clone, whose
/// flags the first program checks.
pub fn programs() -> Result<Vec<BpfProgram>, seccompiler::BackendError> {
    let deny = SeccompFilter::new(
        deny_rules(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        ARCH,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )?;
    Ok(vec![deny.try_into()?, clone3.try_into()?])
}

/// Installs the filter on the calling thread (no_new_privs must be set).
pub fn install() -> Result<(), seccompiler::Error> {
    for program in programs()? {
        seccompiler::apply_filter(&program)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn programs_compile() {
        let programs = super::programs().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs.iter().all(|p| !p.is_empty()));
    }
}
