//! Counting a thread's hits of a tracepoint with `perf_event_open(2)`: the engine
//! counts the system calls that can change a process's memory areas while it reads
//! their flags (`engine::areawatch`).

use super::kabi;
use nix::errno::Errno;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A counter of thread `tid`'s hits of tracepoint `id` (from tracefs
/// `events/<system>/<event>/id`) that pass `filter` (ftrace filter syntax, e.g.
/// `id == 28 || id == 9`), counting from the return of this call. Only the thread
/// itself is counted, not threads or children it creates later (no `inherit`).
pub fn tracepoint_counter(tid: i32, id: u64, filter: &CStr) -> Result<OwnedFd, Errno> {
    let attr = kabi::PerfEventAttrV0 {
        type_: kabi::PERF_TYPE_TRACEPOINT,
        size: kabi::PERF_ATTR_SIZE_VER0,
        config: id,
        // Disabled until the filter is set: it counts nothing unfiltered.
        flags: kabi::PERF_ATTR_DISABLED,
        ..Default::default()
    };
    // SAFETY: `attr` is a live perf_event_attr whose `size` field gives the bytes the
    // kernel may read; the other arguments are integers (pid = tid, any cpu, no group).
    let r = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const kabi::PerfEventAttrV0,
            tid,
            -1,
            -1,
            kabi::PERF_FLAG_FD_CLOEXEC,
        )
    };
    let fd = super::check(r)?;
    // SAFETY: on success the kernel returned a new fd that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: SET_FILTER reads the NUL-terminated string `filter` points to, which
    // outlives the call.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            kabi::PERF_EVENT_IOC_SET_FILTER,
            filter.as_ptr(),
        )
    };
    super::check(r as libc::c_long)?;
    // SAFETY: ENABLE takes no argument.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), kabi::PERF_EVENT_IOC_ENABLE, 0) };
    super::check(r as libc::c_long)?;
    Ok(fd)
}

/// The count so far of a counter made by [`tracepoint_counter`] (still readable
/// after its thread ended).
pub fn read_counter(fd: &OwnedFd) -> Result<u64, Errno> {
    let mut n = [0u8; 8];
    nix::unistd::read(fd, &mut n).and_then(|got| match got {
        8 => Ok(u64::from_ne_bytes(n)),
        _ => Err(Errno::EIO),
    })
}
