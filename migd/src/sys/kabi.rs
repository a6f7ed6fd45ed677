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

// ---- userfaultfd — include/uapi/linux/userfaultfd.h (features up to 6.8) ----

/// `userfaultfd(2)` is syscall 323 on x86-64 (arch/x86/entry/syscalls/syscall_64.tbl).
pub const SYS_USERFAULTFD: i64 = 323;
/// `UFFD_USER_MODE_ONLY`: the fd handles faults from user mode only.
pub const UFFD_USER_MODE_ONLY: u64 = 1;
/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;

/// ioctl numbers: `_IOWR(UFFDIO, nr, struct)` / `_IOR(..)` with UFFDIO = 0xAA.
pub const UFFDIO_API: u64 = 0xC018_AA3F; // _IOWR(0xAA, 0x3F, struct uffdio_api), 24 bytes
pub const UFFDIO_REGISTER: u64 = 0xC020_AA00; // _IOWR(0xAA, 0x00, struct uffdio_register), 32
pub const UFFDIO_UNREGISTER: u64 = 0x8010_AA01; // _IOR(0xAA, 0x01, struct uffdio_range), 16
pub const UFFDIO_WAKE: u64 = 0x8010_AA02; // _IOR(0xAA, 0x02, struct uffdio_range), 16
pub const UFFDIO_COPY: u64 = 0xC028_AA03; // _IOWR(0xAA, 0x03, struct uffdio_copy), 40
pub const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04; // _IOWR(0xAA, 0x04, struct uffdio_zeropage), 32
pub const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06; // _IOWR(0xAA, 0x06, struct uffdio_writeprotect), 24

/// `UFFDIO_REGISTER_MODE_*`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_COPY_MODE_DONTWAKE`.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `UFFD_FEATURE_*` bits.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// 6.4+: write-protect also pages never touched yet (pte markers).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// 6.7+: write faults on write-protected pages are resolved by the kernel (the page
/// is only marked written), for dirty tracking with PAGEMAP_SCAN.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFD_EVENT_*` (the `event` byte of `struct uffd_msg`).
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
/// `UFFD_PAGEFAULT_FLAG_WRITE` / `_WP`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffd_msg`: 32 bytes; `arg` is the union, read per `event`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: [u64; 3],
}

// ---- PAGEMAP_SCAN — include/uapi/linux/fs.h (6.7+) ----

/// `PAGEMAP_SCAN` = `_IOWR('f', 16, struct pm_scan_arg)` (96 bytes).
pub const PAGEMAP_SCAN: u64 = 0xC060_6610;
/// `PM_SCAN_WP_MATCHING`: write-protect the matching pages in the same walk.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail unless the areas are registered for async WP.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_*` categories.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct perf_event_attr` as first published (`PERF_ATTR_SIZE_VER0`, 64 bytes) —
/// include/uapi/linux/perf_event.h. The kernel takes a shorter `size` and reads the
/// later fields as zero.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PerfEventAttrV0 {
    pub type_: u32,
    pub size: u32,
    pub config: u64,
    pub sample_period: u64,
    pub sample_type: u64,
    pub read_format: u64,
    /// The bit fields (`disabled` is bit 0, `inherit` bit 1, ...).
    pub flags: u64,
    pub wakeup_events: u32,
    pub bp_type: u32,
    pub config1: u64,
}
/// `PERF_ATTR_SIZE_VER0` — include/uapi/linux/perf_event.h.
pub const PERF_ATTR_SIZE_VER0: u32 = 64;
/// `PERF_TYPE_TRACEPOINT` — include/uapi/linux/perf_event.h (`config` is then the
/// tracepoint's id from tracefs `events/<system>/<event>/id`).
pub const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `perf_event_attr.disabled`, bit 0 of the bit fields — include/uapi/linux/perf_event.h.
pub const PERF_ATTR_DISABLED: u64 = 1;
/// `PERF_FLAG_FD_CLOEXEC` — include/uapi/linux/perf_event.h.
pub const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `PERF_EVENT_IOC_ENABLE` = `_IO('$', 0)` — include/uapi/linux/perf_event.h.
pub const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `PERF_EVENT_IOC_SET_FILTER` = `_IOW('$', 6, char *)` — include/uapi/linux/perf_event.h.
pub const PERF_EVENT_IOC_SET_FILTER: libc::c_ulong = 0x4008_2406;
/// `map_shadow_stack` is syscall 453 on x86-64 (arch/x86/entry/syscalls/syscall_64.tbl);
/// the `libc` crate does not name it.
pub const SYS_MAP_SHADOW_STACK: libc::c_long = 453;
