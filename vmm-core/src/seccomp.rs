//! Seccomp filters (seccompiler), applied once set-up is done.
//!
//! - vCPU threads: KVM_RUN and the few KVM reads used to report a crash, moving ioeventfds and the video
//!   memory slot when the guest moves a PCI BAR, re-routing an MSI-X vector the guest programs, eventfd and serial writes, futexes, memory for error
//!   messages, signal return (the kick), thread exit.
//! - The VMM's other threads (event loop, control socket): what running, rebooting (a new KVM VM, memory
//!   and vCPU threads) and answering the control socket needs; no exec, no opening of files or sockets,
//!   no ptrace, no mounts.
//!
//! A thread that makes any other system call kills the process (`SECCOMP_RET_KILL_PROCESS`), except
//! `open`/`openat`, which fail with EACCES (see [`no_open_filter`]).

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_irq_routing, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs,
    kvm_sregs, kvm_translation, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

const KVMIO: u32 = 0xAE;
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
// A guest (its firmware, usually) that moves a BAR makes its vCPU thread move the device's notify
// ioeventfds or the video memory slot.
vmm_sys_util::ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_USER_MEMORY_REGION, KVMIO, 0x46, kvm_userspace_memory_region);
// A guest that programs a device's MSI-X table makes its vCPU thread re-route that vector's GSI.
vmm_sys_util::ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
// Saving the machine state: each vCPU thread reads its own vCPU's state while parked.
vmm_sys_util::ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);

/// Why a filter could not be built or applied.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building a filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("applying a filter: {0}")]
    Apply(#[from] seccompiler::Error),
}

fn allow(calls: &[i64]) -> BTreeMap<i64, Vec<SeccompRule>> {
    calls.iter().map(|&c| (c, vec![])).collect()
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// System calls every thread of ours may make: memory, futexes, time, signals, logging, exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_mprotect,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Dropping a file descriptor (a vCPU's, at the end of a boot).
    libc::SYS_close,
    libc::SYS_fcntl,
];

/// The filter of a vCPU thread.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    let mut rules = allow(COMMON);
    let ioctl_is = |cmd: u64| -> Result<SeccompRule, SeccompError> {
        Ok(SeccompRule::new(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd)?])?)
    };
    rules.insert(
        libc::SYS_ioctl,
        vec![
            ioctl_is(KVM_RUN())?,
            ioctl_is(KVM_GET_REGS())?,
            ioctl_is(KVM_GET_SREGS())?,
            ioctl_is(KVM_TRANSLATE())?,
            ioctl_is(KVM_IOEVENTFD())?,
            ioctl_is(KVM_SET_USER_MEMORY_REGION())?,
            ioctl_is(KVM_SET_GSI_ROUTING())?,
            ioctl_is(KVM_GET_FPU())?,
            ioctl_is(KVM_GET_MSRS())?,
            ioctl_is(KVM_GET_LAPIC())?,
            ioctl_is(KVM_GET_MP_STATE())?,
            ioctl_is(KVM_GET_VCPU_EVENTS())?,
            ioctl_is(KVM_GET_DEBUGREGS())?,
            ioctl_is(KVM_GET_XSAVE())?,
            ioctl_is(KVM_GET_XCRS())?,
        ],
    );
    compile(rules)
}

/// The filter of the event loop and the control socket threads.
pub fn vmm_filter() -> Result<BpfProgram, SeccompError> {
    let mut calls = COMMON.to_vec();
    calls.extend_from_slice(&[
        // Event loop and rebuilding the machine on reboot.
        libc::SYS_ioctl,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_lseek,
        libc::SYS_pread64,
        // Disk I/O threads (started by the event-loop thread at each boot).
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fallocate,
        libc::SYS_fstatfs,   // imago, when it opens a file (its discard alignment)
        libc::SYS_ftruncate, // imago, when a qcow2 write allocates clusters past the end of the file
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        // Saving the machine state (control threads only: the other threads' `no_open_filter` refuses
        // these): the temporary file renamed over the target, or removed when the save fails.
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // Opening media (control threads; see `control_open_filter`).
        libc::SYS_flock,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_poll,
        libc::SYS_ppoll,
        // Threads: vCPUs per boot, control connections; kicking vCPUs; their own filters.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        libc::SYS_seccomp,
        libc::SYS_sched_getaffinity,
        libc::SYS_tgkill,
        libc::SYS_rt_sigaction,
        libc::SYS_getrandom,
        // Control socket connections (the listener is bound before the filter applies).
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
    ]);
    compile(allow(&calls))
}

/// A second filter that makes `open`/`openat` fail with EACCES instead of killing the process: glibc
/// opens /sys files internally (e.g. to size malloc arenas when many threads start), and it copes with
/// the failure. Nothing of ours opens files after set-up. Renaming and removing files fail the same way
/// (only the control threads, which save machine states, may).
pub fn no_open_filter() -> Result<BpfProgram, SeccompError> {
    let rules = allow(&[
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
    ]);
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32), TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// The control threads' variant of [`no_open_filter`]: they may open files read-only (media for
/// `attach-media`) and create new files exclusively (`O_CREAT|O_EXCL`: a machine state's temporary file);
/// an open that would write, truncate or append to an existing file fails.
pub fn read_only_open_filter() -> Result<BpfProgram, SeccompError> {
    // One rule per forbidden combination: (flags & mask) == value makes the open fail.
    let (wr, rdwr, creat, excl) =
        (libc::O_WRONLY as u64, libc::O_RDWR as u64, libc::O_CREAT as u64, libc::O_EXCL as u64);
    let forbidden = [
        (wr | creat, wr),     // writing without creating
        (wr | excl, wr),      // writing without O_EXCL
        (rdwr | creat, rdwr), // the same, read-write
        (rdwr | excl, rdwr),
        (creat | excl, creat), // creating without O_EXCL (could open an existing file)
        (libc::O_TRUNC as u64, libc::O_TRUNC as u64),
        (libc::O_APPEND as u64, libc::O_APPEND as u64),
    ];
    let writing = |flags_arg: u8| -> Result<Vec<SeccompRule>, SeccompError> {
        forbidden
            .iter()
            .map(|&(mask, value)| {
                let cond =
                    SeccompCondition::new(flags_arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), value)?;
                Ok(SeccompRule::new(vec![cond])?)
            })
            .collect()
    };
    let rules = BTreeMap::from([(libc::SYS_open, writing(1)?), (libc::SYS_openat, writing(2)?)]);
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32), TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// Applies the control threads' filters: the VMM filter, with read-only opens allowed.
pub fn apply_control_filter() -> Result<(), SeccompError> {
    seccompiler::apply_filter(&read_only_open_filter()?)?;
    seccompiler::apply_filter(&vmm_filter()?)?;
    Ok(())
}

/// Applies the VMM filter to the calling thread (and so to the threads it starts afterwards).
pub fn apply_vmm_filter() -> Result<(), SeccompError> {
    seccompiler::apply_filter(&no_open_filter()?)?;
    seccompiler::apply_filter(&vmm_filter()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(!vcpu_filter().unwrap().is_empty());
        assert!(!vmm_filter().unwrap().is_empty());
        assert!(!read_only_open_filter().unwrap().is_empty());
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(KVM_RUN(), 0xAE80);
        assert_eq!(KVM_GET_REGS(), 0x8090_AE81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_AE83);
        assert_eq!(KVM_TRANSLATE(), 0xC018_AE85);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_AE79);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_AE46);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_AE6A);
        assert_eq!(KVM_GET_MSRS(), 0xC008_AE88);
        assert_eq!(KVM_GET_LAPIC(), 0x8400_AE8E);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_AEA4);
        assert_eq!(KVM_GET_FPU(), 0x81A0_AE8C);
    }
}
