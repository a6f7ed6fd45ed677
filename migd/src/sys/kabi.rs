//! Kernel ABI definitions that Debian 12's headers (and the `libc` crate) lack or
//! spell differently. Each item names the kernel header it comes from.

/// `PTRACE_GET_RSEQ_CONFIGURATION` — include/uapi/linux/ptrace.h (5.13+).
pub const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

/// `struct ptrace_rseq_configuration` — include/uapi/linux/ptrace.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PtraceRseqConfiguration {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// `PTRACE_PEEKSIGINFO_SHARED` — include/uapi/linux/ptrace.h.
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

/// `struct ptrace_peeksiginfo_args` — include/uapi/linux/ptrace.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PtracePeekSiginfoArgs {
    pub off: u64,
    pub flags: u32,
    pub nr: i32,
}

/// `NT_X86_XSTATE` — include/uapi/linux/elf.h.
pub const NT_X86_XSTATE: libc::c_int = 0x202;
/// `NT_PRSTATUS` — include/uapi/linux/elf.h.
pub const NT_PRSTATUS: libc::c_int = 1;

/// `struct clone_args` (version 2, with set_tid and cgroup) — include/uapi/linux/sched.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `PR_SET_MM` and its `PR_SET_MM_MAP` / `PR_SET_MM_MAP_SIZE` sub-options —
/// include/uapi/linux/prctl.h.
pub const PR_SET_MM: libc::c_int = 35;
pub const PR_SET_MM_MAP: libc::c_ulong = 14;

/// `struct prctl_mm_map` — include/uapi/linux/prctl.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PrctlMmMap {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: u64,
    pub auxv_size: u32,
    pub exe_fd: u32,
}

/// `PR_GET_TID_ADDRESS` — include/uapi/linux/prctl.h.
pub const PR_GET_TID_ADDRESS: libc::c_int = 40;

/// `RSEQ_FLAG_UNREGISTER` — include/uapi/linux/rseq.h.
pub const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// `KCMP_FILE` — include/uapi/linux/kcmp.h.
pub const KCMP_FILE: libc::c_int = 0;

/// `ARCH_MAP_VDSO_64` is not used; the vDSO block is moved with mremap instead.
/// `MAP_FIXED_NOREPLACE` — include/uapi/asm-generic/mman-common.h (4.17+).
pub const MAP_FIXED_NOREPLACE: libc::c_int = 0x100000;

/// `CLOSE_RANGE` has no flags we use; `close_range` is syscall 436 on x86-64
/// (arch/x86/entry/syscalls/syscall_64.tbl).
pub const SYS_CLOSE_RANGE: i64 = 436;

/// `TFD_IOC_SET_TICKS` = `_IOW('T', 0, __u64)` — include/uapi/linux/timerfd.h
/// (needs CONFIG_CHECKPOINT_RESTORE).
pub const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;

/// `PR_TIMER_CREATE_RESTORE_IDS` and its `_ON`/`_OFF` values — include/uapi/linux/prctl.h
/// (6.15+): timer_create then takes the wanted timer id from `*created_timer_id`.
pub const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
pub const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;
pub const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
/// `SIGEV_THREAD_ID` — include/uapi/asm-generic/siginfo.h.
pub const SIGEV_THREAD_ID: i32 = 4;
