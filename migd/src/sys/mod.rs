//! Thin wrappers over the raw system calls the engine needs. Every `unsafe` block of
//! the crate lives here, each with the reason it holds.

pub mod kabi;
pub mod perf;
pub mod uffd;

use nix::errno::Errno;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub type Regs = libc::user_regs_struct;

fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret == -1 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn ptrace_raw(
    req: libc::c_uint,
    tid: i32,
    addr: usize,
    data: usize,
) -> Result<libc::c_long, Errno> {
    Errno::clear();
    // SAFETY: ptrace with integer or caller-checked pointer arguments; every caller
    // passes pointers to live buffers of the size the request writes.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 && Errno::last_raw() != 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

pub fn ptrace_seize(tid: i32, options: libc::c_int) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_SEIZE, tid, 0, options as usize).map(drop)
}
pub fn ptrace_interrupt(tid: i32) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}
pub fn ptrace_cont(tid: i32, sig: i32) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_CONT, tid, 0, sig as usize).map(drop)
}
pub fn ptrace_syscall(tid: i32, sig: i32) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_SYSCALL, tid, 0, sig as usize).map(drop)
}
pub fn ptrace_detach(tid: i32, sig: i32) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_DETACH, tid, 0, sig as usize).map(drop)
}
pub fn ptrace_peekdata(tid: i32, addr: u64) -> Result<u64, Errno> {
    ptrace_raw(libc::PTRACE_PEEKDATA, tid, addr as usize, 0).map(|v| v as u64)
}
pub fn ptrace_pokedata(tid: i32, addr: u64, word: u64) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_POKEDATA, tid, addr as usize, word as usize).map(drop)
}
pub fn ptrace_getregs(tid: i32) -> Result<Regs, Errno> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    ptrace_raw(
        libc::PTRACE_GETREGS,
        tid,
        0,
        &mut regs as *mut Regs as usize,
    )?;
    Ok(regs)
}
pub fn ptrace_setregs(tid: i32, regs: &Regs) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_SETREGS, tid, 0, regs as *const Regs as usize).map(drop)
}
/// Reads a register set (e.g. NT_X86_XSTATE) into `buf`; returns the length the kernel filled.
pub fn ptrace_getregset(tid: i32, note: libc::c_int, buf: &mut [u8]) -> Result<usize, Errno> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    ptrace_raw(
        libc::PTRACE_GETREGSET,
        tid,
        note as usize,
        &mut iov as *mut libc::iovec as usize,
    )?;
    Ok(iov.iov_len)
}
pub fn ptrace_setregset(tid: i32, note: libc::c_int, buf: &[u8]) -> Result<(), Errno> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    ptrace_raw(
        libc::PTRACE_SETREGSET,
        tid,
        note as usize,
        &mut iov as *mut libc::iovec as usize,
    )
    .map(drop)
}
pub fn ptrace_getsigmask(tid: i32) -> Result<u64, Errno> {
    let mut mask: u64 = 0;
    ptrace_raw(
        libc::PTRACE_GETSIGMASK,
        tid,
        8,
        &mut mask as *mut u64 as usize,
    )?;
    Ok(mask)
}
pub fn ptrace_setsigmask(tid: i32, mask: u64) -> Result<(), Errno> {
    ptrace_raw(
        libc::PTRACE_SETSIGMASK,
        tid,
        8,
        &mask as *const u64 as usize,
    )
    .map(drop)
}
/// Reads up to 64 queued siginfos (128 bytes each) of a thread or, with `shared`, of
/// the thread group, without dequeuing them.
pub fn ptrace_peeksiginfo(tid: i32, shared: bool) -> Result<Vec<[u8; 128]>, Errno> {
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; 128]; 16];
        let args = kabi::PtracePeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared {
                kabi::PTRACE_PEEKSIGINFO_SHARED
            } else {
                0
            },
            nr: 16,
        };
        let n = ptrace_raw(
            libc::PTRACE_PEEKSIGINFO,
            tid,
            &args as *const kabi::PtracePeekSiginfoArgs as usize,
            buf.as_mut_ptr() as usize,
        )?;
        if n <= 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}
pub fn ptrace_get_rseq(tid: i32) -> Result<kabi::PtraceRseqConfiguration, Errno> {
    let mut conf = kabi::PtraceRseqConfiguration::default();
    ptrace_raw(
        kabi::PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<kabi::PtraceRseqConfiguration>(),
        &mut conf as *mut _ as usize,
    )?;
    Ok(conf)
}
pub fn ptrace_geteventmsg(tid: i32) -> Result<u64, Errno> {
    let mut msg: libc::c_ulong = 0;
    ptrace_raw(
        libc::PTRACE_GETEVENTMSG,
        tid,
        0,
        &mut msg as *mut libc::c_ulong as usize,
    )?;
    Ok(msg as u64)
}

/// waitpid(tid, __WALL); returns the raw status.
pub fn wait_tid(tid: i32) -> Result<i32, Errno> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if r == -1 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return Err(Errno::last());
        }
        return Ok(status);
    }
}

/// waitpid(pid, 0) for a plain child; returns the raw status.
pub fn wait_child(pid: i32) -> Result<i32, Errno> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == -1 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return Err(Errno::last());
        }
        return Ok(status);
    }
}

/// Reads `buf.len()` bytes of another process's memory at `addr`.
pub fn vm_read(pid: i32, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers `buf`, which we own mutably; remote memory is
    // accessed by the kernel on the other process's behalf.
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    check(r as libc::c_long).map(|n| n as usize)
}

/// [`vm_read`] of all of `buf`: a short read is `EIO`.
pub fn vm_read_exact(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    match vm_read(pid, addr, buf)? {
        n if n == buf.len() => Ok(()),
        _ => Err(Errno::EIO),
    }
}

/// Asks the file system for `fd`'s attributes afresh (statx with
/// AT_STATX_FORCE_SYNC): a FUSE file's size cached by the kernel may be behind what
/// another node wrote; returns the size now.
pub fn refresh_size(fd: RawFd) -> Result<u64, Errno> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string (with AT_EMPTY_PATH `fd` itself is
    // examined) and `st` is a statx we own for the kernel to fill.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_FORCE_SYNC,
            libc::STATX_SIZE,
            &mut st,
        )
    };
    check(r as libc::c_long).map(|_| st.stx_size)
}

/// Closes `f` and returns what close(2) says: on a network file system the end of
/// the writes queued behind our back (`drop` of a `File` ignores it).
pub fn close_checked(f: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    nix::unistd::close(f.into_raw_fd()).map_err(std::io::Error::from)
}

/// Pushes what was written through `f` to the file system's server without closing
/// `f`: closes a duplicate of it, which makes the kernel send FUSE a flush (fuse-client
/// then waits for the writes it queued) and returns what that says.
pub fn flush_checked(f: &std::fs::File) -> std::io::Result<()> {
    close_checked(f.try_clone()?)
}

/// Drops this node's clean cached pages of `f` in `[off, off + len)` (len 0: to
/// the end; posix_fadvise DONTNEED), so that the next read asks the file system:
/// for a FUSE file another node writes, a page cached while it was shorter holds
/// zeros where the other node's later writes are.
pub fn drop_cached(f: &impl std::os::fd::AsFd, off: u64, len: u64) -> Result<(), Errno> {
    nix::fcntl::posix_fadvise(
        f,
        off as libc::off_t,
        len as libc::off_t,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
}

/// Writes `buf` into another process's memory at `addr`.
pub fn vm_write(pid: i32, addr: u64, buf: &[u8]) -> Result<usize, Errno> {
    let local = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers `buf`, which the kernel only reads.
    let r = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    check(r as libc::c_long).map(|n| n as usize)
}

pub fn kcmp_file(pid1: i32, pid2: i32, fd1: i32, fd2: i32) -> Result<i64, Errno> {
    // SAFETY: kcmp takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kabi::KCMP_FILE, fd1, fd2) };
    check(r)
}

pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: on success the kernel returned a new fd that we now own.
    check(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn pidfd_getfd(pidfd: RawFd, fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_getfd takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
    // SAFETY: on success the kernel returned a new fd that we now own.
    check(r).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// get_robust_list(tid): (head, len).
pub fn get_robust_list(tid: i32) -> Result<(u64, u64), Errno> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: both out-pointers are valid for the sizes the kernel writes.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &mut head, &mut len) };
    check(r).map(|_| (head, len as u64))
}

pub fn prlimit_get(pid: i32, res: i32) -> Result<(u64, u64), Errno> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid out-pointer; the new-limit pointer is null.
    let r = unsafe { libc::prlimit64(pid, res as _, std::ptr::null(), &mut old) };
    check(r as libc::c_long).map(|_| (old.rlim_cur, old.rlim_max))
}

/// Makes the calling thread yield the CPU to everyone else (nice 19; on Linux the
/// nice value is the thread's own): for work nobody waits for.
pub fn background_thread() -> Result<(), Errno> {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    check(r as libc::c_long).map(drop)
}

pub fn prlimit_set(pid: i32, res: i32, cur: u64, max: u64) -> Result<(), Errno> {
    let new = libc::rlimit64 {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: `new` is a valid in-pointer; the old-limit pointer is null.
    let r = unsafe { libc::prlimit64(pid, res as _, &new, std::ptr::null_mut()) };
    check(r as libc::c_long).map(drop)
}

/// clone3 with `args`; returns 0 in the child, the child's pid in the parent.
///
/// # Safety
/// Without CLONE_VM this behaves as fork: the caller must be single-threaded or keep
/// the child to async-signal-safe work.
pub unsafe fn clone3(args: &kabi::CloneArgs) -> Result<i32, Errno> {
    // SAFETY: `args` points to a valid clone_args of the size passed; the caller
    // upholds the fork-safety contract documented above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const kabi::CloneArgs,
            std::mem::size_of::<kabi::CloneArgs>(),
        )
    };
    check(r).map(|v| v as i32)
}

/// fork(2).
///
/// # Safety
/// The caller must be single-threaded or keep the child to async-signal-safe work.
pub unsafe fn fork() -> Result<i32, Errno> {
    // SAFETY: contract forwarded to the caller.
    let r = unsafe { libc::fork() };
    check(r as libc::c_long).map(|v| v as i32)
}

pub fn unshare(flags: i32) -> Result<(), Errno> {
    // SAFETY: unshare takes only integers.
    check(unsafe { libc::unshare(flags) } as libc::c_long).map(drop)
}

/// mmap a fresh anonymous area at exactly `addr` (fails if anything is there).
pub fn mmap_anon_noreplace(addr: u64, len: usize, prot: i32) -> Result<*mut u8, Errno> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | kabi::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(Errno::last())
    } else {
        Ok(p.cast())
    }
}

/// A private anonymous read-write mapping of `len` bytes (zeros until written;
/// `MAP_NORESERVE`: only the pages written take memory), unmapped on drop. It stands
/// in for a large file of which only some parts are read.
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

impl AnonMap {
    pub fn new(len: usize) -> Result<AnonMap, Errno> {
        if len == 0 {
            return Ok(AnonMap {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a new private mapping chosen by the kernel; nothing aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(AnonMap { ptr: p.cast(), len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live read-write mapping owned by self (or an
        // empty slice at a dangling, aligned pointer).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Gives `len` bytes at `off` back to the kernel (`MADV_DONTNEED`): they read
    /// as zeros from now on, and the freed pages are the next ones this node hands
    /// out (on this VM, touching memory never used before costs several times a
    /// copy: see docs/lazy.md "Warm pages").
    pub fn discard(&mut self, off: usize, len: usize) -> Result<(), Errno> {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "discard beyond the mapping"
        );
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside the mapping this value owns (checked above)
        // and `&mut self` means no reference into it is alive.
        let r = unsafe { libc::madvise(self.ptr.add(off).cast(), len, libc::MADV_DONTNEED) };
        Errno::result(r).map(drop)
    }

    /// Leaves the mapping out of children forked from now on (`MADV_DONTFORK`): a
    /// fork would otherwise copy its page tables (milliseconds per GiB written).
    pub fn keep_from_children(&self) -> Result<(), Errno> {
        if self.len == 0 {
            return Ok(());
        }
        // SAFETY: advice on exactly the mapping this value owns; it changes what
        // a fork copies, not the mapping's contents.
        let r = unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_DONTFORK) };
        Errno::result(r).map(drop)
    }
}

// SAFETY: the mapping belongs to the value alone (nothing else holds its pointer)
// and has no tie to the thread that made it; moving the owner moves the whole of it.
unsafe impl Send for AnonMap {}
// SAFETY: shared references only read (`bytes`); writing needs `&mut self`.
unsafe impl Sync for AnonMap {}

impl Drop for AnonMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly the mapping this value owns.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// A read-only mapping of a whole file, unmapped on drop.
pub struct FileMap {
    ptr: *mut u8,
    len: usize,
}

impl FileMap {
    pub fn map(fd: RawFd, len: usize) -> Result<FileMap, Errno> {
        if len == 0 {
            return Ok(FileMap {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a new shared read-only mapping chosen by the kernel; nothing aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(FileMap { ptr: p.cast(), len })
    }
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: ptr/len describe a live read-only mapping owned by self. The file may
        // be truncated underneath (SIGBUS); image files belong to the engine.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly the mapping this value owns.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// Sets every signal's mask bit in the calling thread.
pub fn block_all_signals() {
    // SAFETY: sigset is initialised by sigfillset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// pause(2).
pub fn pause() {
    // SAFETY: pause takes no arguments.
    unsafe { libc::pause() };
}

/// _exit(2): leaves without running destructors or atexit handlers (for forked children).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Writes `buf` to a raw fd (async-signal-safe, for forked children).
pub fn write_raw(fd: RawFd, buf: &[u8]) -> isize {
    // SAFETY: buf is a valid slice for its length.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
}

/// Reads from a raw fd.
pub fn read_raw(fd: RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: buf is a valid mutable slice for its length.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
}

/// Resets a signal's disposition to default and raises it (to die of the same signal).
pub fn die_of_signal(sig: i32) -> ! {
    // SAFETY: plain libc calls; if the signal does not kill us we exit.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
        libc::_exit(128 + sig)
    }
}

/// tee(2) between two pipes without consuming the source.
pub fn tee(fd_in: RawFd, fd_out: RawFd, len: usize) -> Result<usize, Errno> {
    // SAFETY: tee takes only integers.
    let r = unsafe { libc::tee(fd_in, fd_out, len, libc::SPLICE_F_NONBLOCK) };
    check(r as libc::c_long).map(|v| v as usize)
}

/// pipe2(O_CLOEXEC).
pub fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
}

/// fcntl(fd, F_GETPIPE_SZ).
pub fn pipe_size(fd: RawFd) -> Result<i32, Errno> {
    // SAFETY: fcntl with an integer command.
    check(unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) } as libc::c_long).map(|v| v as i32)
}

/// fcntl(fd, F_SETPIPE_SZ, size).
pub fn set_pipe_size(fd: RawFd, size: i32) -> Result<(), Errno> {
    // SAFETY: fcntl with integer arguments.
    check(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size) } as libc::c_long).map(drop)
}

/// Closes an fd this process keeps by number (not owned by any Rust value, such
/// as a restorer's relay ends): the caller vouches that nothing else uses it.
pub fn close_kept(fd: RawFd) {
    // SAFETY: close takes an integer; the caller guarantees no live owner of `fd`.
    unsafe { libc::close(fd) };
}

/// ioctl(fd, FIONREAD): bytes buffered in a pipe or FIFO.
pub fn fionread(fd: RawFd) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which is valid for the call.
    check(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) } as libc::c_long)?;
    Ok(n as usize)
}

/// tkill(tid, sig): sends `sig` to one thread.
pub fn tkill(tid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: tkill takes only integers.
    check(unsafe { libc::syscall(libc::SYS_tkill, tid, sig) }).map(drop)
}

/// Sends `sig` to a process.
pub fn kill(pid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: kill takes only integers.
    check(unsafe { libc::kill(pid, sig) } as libc::c_long).map(drop)
}

/// Whether `path` is on a FUSE file system (`/...`). Image files on the store are
/// read and written there with O_DIRECT: each page goes through once, and the page
/// cache would only cost a copy and its upkeep (reads: 1.7 CPU-seconds per GiB
/// through `/...` here instead of 2.2, in the same time with four readers; writes:
/// 1 GiB in 8 MiB writes at 0.58-0.94 GB/s against 0.33-0.57 buffered, the kernel
/// sending the 1 MiB requests of one write together). FUSE asks no alignment of
/// O_DIRECT buffers or offsets.
/// Local files (the engine's tests) go through the page cache.
pub fn on_fuse(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC)
}

fn direct_flag(direct: bool) -> i32 {
    if direct {
        libc::O_DIRECT
    } else {
        0
    }
}

/// Opens `path` for reading, with O_DIRECT when `direct` (see [`on_fuse`]).
pub fn open_read(path: &Path, direct: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(direct_flag(direct))
        .open(path)
}

/// Opens the existing file `path` for writing, with O_DIRECT when `direct` (see
/// [`on_fuse`]).
pub fn open_write(path: &Path, direct: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(direct_flag(direct))
        .open(path)
}

/// Creates (or truncates) `path` for writing, with O_DIRECT when `direct` (see
/// [`on_fuse`]).
pub fn create_write(path: &Path, direct: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(direct_flag(direct))
        .open(path)
}

/// Returns this machine's page size.
pub fn page_size() -> u64 {
    4096
}

/// XSAVE area size from CPUID(0xD, 0).EBX (the size for the currently enabled features).
pub fn xsave_size() -> usize {
    let r = std::arch::x86_64::__cpuid_count(0xd, 0);
    r.ebx as usize
}

/// Maps `len` bytes RWX at exactly `addr` and copies `code` to its start (for the
/// restore gadget, in the forked child that becomes the restored process).
pub fn install_gadget(addr: u64, len: usize, code: &[u8]) -> Result<(), Errno> {
    let p = mmap_anon_noreplace(
        addr,
        len,
        libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
    )?;
    if p as u64 != addr {
        return Err(Errno::EEXIST);
    }
    // SAFETY: p points to `len` fresh writable bytes that nothing else references and
    // code.len() <= len (callers pass a few bytes into at least a page).
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len().min(len)) };
    Ok(())
}

/// waitpid(-1, 0) for any child; returns (pid, raw status).
pub fn wait_any() -> Result<(i32, i32), Errno> {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == -1 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return Err(Errno::last());
        }
        return Ok((r, status));
    }
}

/// Closes every fd of the calling process except `keep`.
pub fn close_all_but(keep: RawFd) {
    // SAFETY: close_range takes only integers; the caller owns no Rust object holding
    // the closed fds (used in forked children only).
    unsafe {
        if keep > 0 {
            libc::syscall(kabi::SYS_CLOSE_RANGE, 0u32, (keep - 1) as u32, 0u32);
        }
        libc::syscall(kabi::SYS_CLOSE_RANGE, (keep + 1) as u32, u32::MAX, 0u32);
    }
}

/// fcntl(fd, F_GET_SEALS).
pub fn get_seals(fd: RawFd) -> Result<i32, Errno> {
    // SAFETY: fcntl with an integer command.
    check(unsafe { libc::fcntl(fd, libc::F_GET_SEALS) } as libc::c_long).map(|v| v as i32)
}

/// A terminal's modes (termios) and window size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TtyState {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: Vec<u8>,
    pub ispeed: u32,
    pub ospeed: u32,
    /// rows, cols, xpixel, ypixel.
    pub winsize: [u16; 4],
}

/// Reads a terminal's modes and window size (ENOTTY for other files).
pub fn tty_get(fd: RawFd) -> Result<TtyState, Errno> {
    // SAFETY: termios and winsize are plain integers; the kernel fills them.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(Errno::last());
        }
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) != 0 {
            return Err(Errno::last());
        }
        Ok(TtyState {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            line: t.c_line,
            cc: t.c_cc.to_vec(),
            ispeed: t.c_ispeed,
            ospeed: t.c_ospeed,
            winsize: [ws.ws_row, ws.ws_col, ws.ws_xpixel, ws.ws_ypixel],
        })
    }
}

/// Puts back what [`tty_get`] read.
pub fn tty_set(fd: RawFd, s: &TtyState) -> Result<(), Errno> {
    // SAFETY: termios and winsize are plain integers, fully initialised here.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(Errno::last());
        }
        t.c_iflag = s.iflag;
        t.c_oflag = s.oflag;
        t.c_cflag = s.cflag;
        t.c_lflag = s.lflag;
        t.c_line = s.line;
        for (d, v) in t.c_cc.iter_mut().zip(&s.cc) {
            *d = *v;
        }
        t.c_ispeed = s.ispeed;
        t.c_ospeed = s.ospeed;
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(Errno::last());
        }
        let ws = libc::winsize {
            ws_row: s.winsize[0],
            ws_col: s.winsize[1],
            ws_xpixel: s.winsize[2],
            ws_ypixel: s.winsize[3],
        };
        if libc::ioctl(fd, libc::TIOCSWINSZ, &ws) != 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

static FORWARD_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = FORWARD_TO.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe and takes only integers.
        unsafe { libc::kill(pid, sig) };
    }
}

/// From now on, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1 and SIGUSR2 sent to this
/// process are passed on to `pid` (the restored process) instead.
pub fn forward_signals_to(pid: i32) {
    FORWARD_TO.store(pid, std::sync::atomic::Ordering::Relaxed);
    for sig in [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: the handler only loads an atomic and calls kill (async-signal-safe);
        // the sigaction struct is fully initialised.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}
