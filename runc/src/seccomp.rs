//! The `RuntimeDefault` seccomp profile.
//!
//! Docker's and containerd's default profiles allow a long list of system calls and deny
//! the rest. This one states the same policy the other way round: it denies, with
//! `EPERM`, the calls those profiles leave out that a container could use against the
//! node or its neighbours (kernel modules, keyrings, kexec, BPF, perf, mounts and
//! namespaces, ptrace across processes, clocks, swap, reboot, io_uring), and allows the
//! rest. Calls that need a capability the container has (`SYS_ADMIN`, `SYS_PTRACE`,
//! `SYS_TIME`, …) are allowed to it, as in Docker's profile. Only the node's native
//! architecture is listed: a call through another ABI (32-bit x86 on amd64) is refused
//! by runc's filter as a bad architecture.

use std::collections::HashSet;

use oci_spec::runtime::{Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSyscall};

/// Denied unless the container holds the capability beside them.
const GUARDED: &[(Option<Capability>, &[&str])] = &[
    (
        None,
        &[
            "add_key",
            "keyctl",
            "request_key",
            "kexec_load",
            "kexec_file_load",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "uselib",
            "userfaultfd",
            "ustat",
            "sysfs",
            "_sysctl",
            "vm86",
            "vm86old",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ],
    ),
    (
        Some(Capability::SysModule),
        &["init_module", "finit_module", "delete_module"],
    ),
    (
        Some(Capability::SysAdmin),
        &[
            "bpf",
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "name_to_handle_at",
            "open_by_handle_at",
            "quotactl",
            "lookup_dcookie",
            "perf_event_open",
            "swapon",
            "swapoff",
        ],
    ),
    (Some(Capability::SysBoot), &["reboot"]),
    (Some(Capability::SysPacct), &["acct"]),
    (
        Some(Capability::SysPtrace),
        &["ptrace", "process_vm_readv", "process_vm_writev", "kcmp"],
    ),
    (
        Some(Capability::SysTime),
        &["settimeofday", "stime", "clock_settime", "clock_adjtime"],
    ),
    (Some(Capability::SysRawio), &["iopl", "ioperm"]),
    (
        Some(Capability::SysNice),
        &["get_mempolicy", "set_mempolicy", "mbind", "move_pages"],
    ),
];

/// `EPERM`, what a denied call returns.
const EPERM: u32 = 1;

fn native_arch() -> Vec<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => vec![Arch::ScmpArchX86_64],
        "aarch64" => vec![Arch::ScmpArchAarch64],
        "arm" => vec![Arch::ScmpArchArm],
        "s390x" => vec![Arch::ScmpArchS390x],
        "powerpc64" => vec![Arch::ScmpArchPpc64le],
        "riscv64" => vec![Arch::ScmpArchRiscv64],
        _ => Vec::new(),
    }
}

/// The names the profile denies to a container holding `caps`.
pub fn denied(caps: &HashSet<Capability>) -> Vec<&'static str> {
    GUARDED
        .iter()
        .filter(|(cap, _)| cap.is_none_or(|c| !caps.contains(&c)))
        .flat_map(|(_, names)| names.iter().copied())
        .collect()
}

/// The profile for a container holding `caps`.
pub fn runtime_default(caps: &HashSet<Capability>) -> LinuxSeccomp {
    let mut deny = LinuxSyscall::default();
    deny.set_names(denied(caps).into_iter().map(String::from).collect());
    deny.set_action(LinuxSeccompAction::ScmpActErrno);
    deny.set_errno_ret(Some(EPERM));
    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActAllow);
    profile.set_architectures(Some(native_arch()));
    profile.set_syscalls(Some(vec![deny]));
    profile
}
