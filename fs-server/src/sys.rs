//! Thin wrappers over the raw system calls fs-server makes. Every `unsafe` block of the
//! crate lives here; the rest of the crate sees safe functions over `OwnedFd`s and
//! `CStr`s that return `io::Result`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_long(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by a successful syscall that creates a new
    // descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// AT_FDCWD as a descriptor for the *at calls.
pub fn cwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a sentinel the *at syscalls accept for the whole life of the
    // process; it is never closed.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

/// MAX_HANDLE_SZ from include/linux/exportfs.h.
pub const MAX_HANDLE_SZ: usize = 128;

/// A kernel file handle (`struct file_handle` of name_to_handle_at(2)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelHandle {
    pub handle_type: i32,
    pub bytes: Vec<u8>,
}

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// name_to_handle_at(fd, "", AT_EMPTY_PATH): the kernel handle of the object `fd`
/// refers to (O_PATH fds work) and the id of the mount it is on.
pub fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<(KernelHandle, i32)> {
    let mut h = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as libc::c_uint,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: the path is a valid empty C string, `h` is a writable file_handle with
    // handle_bytes set to the room that follows it, and `mount_id` is a valid int.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut h as *mut RawHandle,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    cvt_long(r)?;
    let n = (h.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok((
        KernelHandle {
            handle_type: h.handle_type,
            bytes: h.f_handle[..n].to_vec(),
        },
        mount_id,
    ))
}

/// open_by_handle_at(2): needs CAP_DAC_READ_SEARCH, so call it with the server's own
/// credentials (outside a [`CredGuard`]).
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    h: &KernelHandle,
    flags: i32,
) -> io::Result<OwnedFd> {
    if h.bytes.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut raw = RawHandle {
        handle_bytes: h.bytes.len() as libc::c_uint,
        handle_type: h.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..h.bytes.len()].copy_from_slice(&h.bytes);
    // SAFETY: `raw` is a valid file_handle whose handle_bytes matches the bytes that
    // follow it; the kernel only reads it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut raw as *mut RawHandle,
            flags | libc::O_CLOEXEC,
        )
    };
    owned(cvt_long(r)? as libc::c_int)
}

/// openat(2).
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the result is checked and owned.
    owned(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })
}

/// The /proc path that names what `fd` refers to (a "magic link"). Going through it
/// re-checks permissions with the calling thread's fsuid, which is how an O_PATH fd
/// opened as root becomes a data fd opened as the caller.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// The path the kernel gives for what `fd` refers to (readlink of its magic link),
/// relative to this process's root; " (deleted)" is appended for unlinked files.
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let path = proc_path(fd);
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `path` is a valid C string and `buf` is writable for its length.
    let n = cvt_size(unsafe {
        libc::readlink(
            path.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Reopens what an O_PATH fd refers to with `flags`, permission-checked as the caller.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let path = proc_path(fd);
    // SAFETY: `path` is a valid C string; the result is checked and owned.
    owned(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, 0) })
}

/// statx(2) of `name` relative to `dir` ("" with AT_EMPTY_PATH for the fd itself).
pub fn statx(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<libc::statx> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid C string and `st` a writable statx.
    cvt(unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID,
            &mut st,
        )
    })?;
    Ok(st)
}

/// statx of the object an fd refers to, without following a symlink.
pub fn fstatx(fd: BorrowedFd<'_>, dont_sync: bool) -> io::Result<libc::statx> {
    let mut flags = libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW;
    if dont_sync {
        flags |= libc::AT_STATX_DONT_SYNC;
    }
    statx(fd, c"", flags)
}

/// The mount id of what `fd` refers to, asking the file system for nothing: statx
/// with an empty mask, which even a FUSE mount that refuses us (no allow_other) or
/// whose daemon hangs answers without a request.
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the empty path is a valid C string and `st` a writable statx.
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC,
            0,
            &mut st,
        )
    })?;
    Ok(st.stx_mnt_id)
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    cvt(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            dev as libc::dev_t,
        )
    })?;
    Ok(())
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both are valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// Makes a new name for what `target` (an O_PATH fd) refers to, through its /proc
/// magic link, so that no CAP_DAC_READ_SEARCH is needed.
pub fn link_fd(target: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let path = proc_path(target);
    // SAFETY: both paths are valid C strings.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            path.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(())
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: both names are valid C strings.
    cvt(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

/// readlinkat(fd, "") of an O_PATH fd on a symlink.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for its length; the empty path is a valid C string.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// chown of what an fd (O_PATH fine) refers to, never following a symlink.
pub fn fchown_empty(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let u = uid.unwrap_or(u32::MAX);
    let g = gid.unwrap_or(u32::MAX);
    // SAFETY: the empty path is a valid C string.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            u,
            g,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// chmod through the /proc magic link (permission-checked with the caller's fsuid).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: `path` is a valid C string.
    cvt(unsafe { libc::chmod(path.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// truncate through the /proc magic link (permission-checked with the caller's fsuid).
pub fn truncate_fd_path(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: `path` is a valid C string.
    cvt(unsafe { libc::truncate(path.as_ptr(), size as libc::off_t) })?;
    Ok(())
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) })?;
    Ok(())
}

/// A time for utimensat: unchanged, now, or given.
#[derive(Debug, Clone, Copy)]
pub enum UTime {
    Omit,
    Now,
    At(i64, u32),
}

fn timespec(t: UTime) -> libc::timespec {
    match t {
        UTime::Omit => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        UTime::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        UTime::At(s, n) => libc::timespec {
            tv_sec: s as libc::time_t,
            tv_nsec: n as libc::c_long,
        },
    }
}

/// utimensat(fd, "", AT_EMPTY_PATH): sets times of what an O_PATH fd refers to.
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: UTime, mtime: UTime) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: `ts` holds two timespecs; the empty path is a valid C string.
    cvt(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            ts.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// pread(2) into `buf`'s spare capacity (no zeroing first: a 1 MiB read's memset
/// was 3% of the CPU of a large read through `/...`); the bytes read are appended.
pub fn pread_append(
    fd: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
    offset: u64,
) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let want = max.min(spare.len());
    // SAFETY: `spare` is writable for at least `want` bytes; the kernel writes at
    // most `want` bytes there.
    let n = cvt_size(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            spare.as_mut_ptr() as *mut libc::c_void,
            want,
            offset as libc::off_t,
        )
    })?;
    // SAFETY: the kernel initialised the first `n` (<= want) bytes of the spare
    // capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    // SAFETY: `buf` is readable for its length.
    cvt_size(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            offset as libc::off_t,
        )
    })
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain syscalls on a borrowed fd.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })?;
    Ok(())
}

pub fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a writable statfs.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// Raises the soft limit of open files to the hard limit (each client open and lock
/// owner holds a descriptor). Returns the new limit.
pub fn raise_nofile() -> io::Result<u64> {
    // SAFETY: rlimit is plain old data; all-zero is a valid value.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `rl` is a writable rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    if rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: `rl` is a valid rlimit.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) })?;
    }
    Ok(rl.rlim_cur)
}

/// Sets the process umask (fs-server applies each client's umask itself).
pub fn set_umask(mask: u32) {
    // SAFETY: umask cannot fail.
    unsafe {
        libc::umask(mask as libc::mode_t);
    }
}

/// One entry of getdents64.
#[derive(Debug, Clone)]
pub struct RawDirEnt {
    pub ino: u64,
    /// Position after this entry (the cookie to continue from).
    pub off: i64,
    pub typ: u8,
    pub name: Vec<u8>,
}

/// Reads up to `max` entries of a directory starting at position `pos` (a d_off of a
/// previous entry, or 0).
pub fn read_dir_at(fd: BorrowedFd<'_>, pos: i64, max: usize) -> io::Result<Vec<RawDirEnt>> {
    // SAFETY: plain lseek on a borrowed fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), pos as libc::off_t, libc::SEEK_SET) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while out.len() < max {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        let n = cvt_long(n)? as usize;
        if n == 0 {
            break;
        }
        let mut at = 0;
        while at + 19 <= n && out.len() < max {
            let ino = u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
            let off = i64::from_ne_bytes(buf[at + 8..at + 16].try_into().expect("8 bytes"));
            let reclen =
                u16::from_ne_bytes(buf[at + 16..at + 18].try_into().expect("2 bytes")) as usize;
            let typ = buf[at + 18];
            if reclen < 19 || at + reclen > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "getdents64 returned a malformed record",
                ));
            }
            let raw = &buf[at + 19..at + reclen];
            let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            out.push(RawDirEnt {
                ino,
                off,
                typ,
                name: raw[..len].to_vec(),
            });
            at += reclen;
        }
        if at < n {
            // Stopped early at `max`: the caller continues from the last entry's d_off.
            break;
        }
    }
    Ok(out)
}

/// An open-file-description (OFD) POSIX lock request or answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfdLock {
    pub typ: i32,
    pub start: i64,
    /// 0 = to end of file.
    pub len: i64,
    pub pid: i32,
}

fn flock_of(l: &OfdLock) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = l.typ as libc::c_short;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = l.start as libc::off_t;
    f.l_len = l.len as libc::off_t;
    f.l_pid = 0;
    f
}

/// F_OFD_SETLK (never waits).
pub fn ofd_setlk(fd: BorrowedFd<'_>, l: &OfdLock) -> io::Result<()> {
    let f = flock_of(l);
    // SAFETY: `f` is a valid flock the kernel only reads.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &f) })?;
    Ok(())
}

/// F_OFD_GETLK: the first lock that would conflict with `l`, or F_UNLCK.
pub fn ofd_getlk(fd: BorrowedFd<'_>, l: &OfdLock) -> io::Result<OfdLock> {
    let mut f = flock_of(l);
    // SAFETY: `f` is a valid, writable flock.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut f) })?;
    Ok(OfdLock {
        typ: f.l_type as i32,
        start: f.l_start,
        len: f.l_len,
        pid: f.l_pid,
    })
}

/// flock(2) with LOCK_NB added.
pub fn flock_nb(fd: BorrowedFd<'_>, op: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    cvt(unsafe { libc::flock(fd.as_raw_fd(), op | libc::LOCK_NB) })?;
    Ok(())
}

/// The calling thread's file-system credentials switched to a client's, restored on
/// drop. Only this thread changes: fsuid/fsgid are per-thread, and the groups are set
/// with the raw setgroups syscall (glibc's wrapper would change every thread).
///
/// While fsuid is not 0 the kernel drops the thread's file-system capabilities
/// (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER, ...), so it checks permissions exactly as
/// it would for the client's own process.
pub struct CredGuard {
    old_uid: u32,
    old_gid: u32,
    old_groups: Vec<libc::gid_t>,
}

fn raw_setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: `groups` is readable for its length; SYS_setgroups changes only the
    // calling thread's credentials.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    cvt_long(r)?;
    Ok(())
}

fn getgroups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: size 0 with a null pointer only asks for the count.
    let n = cvt(unsafe { libc::getgroups(0, std::ptr::null_mut()) })?;
    let mut g = vec![0; n as usize];
    // SAFETY: `g` is writable for `n` entries.
    let n = cvt(unsafe { libc::getgroups(n, g.as_mut_ptr()) })?;
    g.truncate(n as usize);
    Ok(g)
}

fn setfsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid only changes this thread's fsuid; it cannot fail in a way that
    // harms memory safety.
    unsafe { libc::setfsuid(uid) as u32 }
}

fn setfsgid(gid: u32) -> u32 {
    // SAFETY: as setfsuid.
    unsafe { libc::setfsgid(gid) as u32 }
}

impl CredGuard {
    /// Switches this thread to `uid`/`gid`/`groups`.
    pub fn enter(uid: u32, gid: u32, groups: &[u32]) -> io::Result<CredGuard> {
        if groups.len() > 65536 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let old_groups = getgroups()?;
        raw_setgroups(groups)?;
        let old_gid = setfsgid(gid);
        let old_uid = setfsuid(uid);
        let guard = CredGuard {
            old_uid,
            old_gid,
            old_groups,
        };
        // setfsuid/setfsgid report no errors: read the values back.
        if setfsuid(u32::MAX) != uid || setfsgid(u32::MAX) != gid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(guard)
    }
}

impl Drop for CredGuard {
    fn drop(&mut self) {
        // fsuid first: back to 0 gives the capabilities back.
        setfsuid(self.old_uid);
        setfsgid(self.old_gid);
        if let Err(e) = raw_setgroups(&self.old_groups) {
            tracing::error!(error = %e, "cannot restore the worker thread's groups");
        }
    }
}

/// Encodes a dev_t as FUSE / the kernel's `new_encode_dev` (u32).
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Decodes a `new_encode_dev` u32 into a dev_t.
pub fn decode_dev(dev: u32) -> u64 {
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_round_trip() {
        let enc = encode_dev(8, 17);
        let dev = decode_dev(enc);
        assert_eq!((libc::major(dev), libc::minor(dev)), (8, 17));
        let enc = encode_dev(259, 70000);
        let dev = decode_dev(enc);
        assert_eq!((libc::major(dev), libc::minor(dev)), (259, 70000));
    }
}
