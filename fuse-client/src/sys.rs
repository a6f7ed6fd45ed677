//! The crate's only raw system calls: the unmount watcher (fork, pipe, umount2) and a
//! lazy unmount.
//!
//! Why a watcher: fuser's own `auto_unmount` goes through the setuid `fusermount3`
//! helper, which Debian does not install by default and which the local cluster's
//! nodes do not have. So fuse-client forks, *before mounting*, a tiny child that holds
//! the read end of a pipe. The parent writes `M` once the mount is up and `U` when it
//! has unmounted cleanly; if the pipe reaches end-of-file while the last byte read is
//! `M`, the parent died without unmounting (SIGKILL, panic, OOM) and the child detaches
//! the mount (`umount2(MNT_DETACH)`) so that no dead mount ("Transport endpoint is not
//! connected") is left behind.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The parent's side of the unmount watcher.
#[derive(Debug)]
pub struct UnmountWatcher {
    write: Option<OwnedFd>,
    pid: libc::pid_t,
}

impl UnmountWatcher {
    /// Forks the watcher for `mountpoint`. Call it before mounting, so that the child
    /// does not inherit the /dev/fuse descriptor.
    pub fn spawn(mountpoint: &Path) -> io::Result<UnmountWatcher> {
        let path = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mountpoint has a NUL"))?;
        let devnull = CString::new("/dev/null").expect("no NUL");
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fork is called with every argument prepared beforehand; the child
        // (pid 0 branch) only makes async-signal-safe system calls and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: in the child of a fork; `watch` only uses async-signal-safe calls
            // on memory prepared before the fork, and exits.
            unsafe { watch(read.as_raw_fd(), &path, &devnull) }
        }
        drop(read);
        Ok(UnmountWatcher {
            write: Some(write),
            pid,
        })
    }

    fn send(&self, byte: u8) {
        if let Some(fd) = &self.write {
            // SAFETY: `fd` is an open pipe descriptor we own; the buffer is one valid byte.
            let _ = unsafe { libc::write(fd.as_raw_fd(), [byte].as_ptr().cast(), 1) };
        }
    }

    /// The mount is up: from now on, our death unmounts it.
    pub fn arm(&self) {
        self.send(b'M');
    }

    /// We unmounted (or never mounted): let the watcher go without touching anything.
    pub fn disarm(mut self) {
        self.send(b'U');
        self.write.take();
        let mut status = 0;
        // SAFETY: `pid` is our own child; status is a valid int to fill.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The child's loop. Never returns.
///
/// # Safety
/// Only to be called in the child right after `fork`; `path` and `devnull` must be
/// valid C strings allocated before the fork.
unsafe fn watch(read: RawFd, path: &CString, devnull: &CString) -> ! {
    // SAFETY: all calls below are async-signal-safe system calls on descriptors and
    // memory that belong to this (single-threaded) child.
    unsafe {
        libc::setsid();
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
        }
        // Keep nothing of the parent but the pipe: no sockets, no listeners.
        let fd = if read == 3 {
            3
        } else {
            let moved = libc::dup2(read, 3);
            if moved < 0 {
                libc::_exit(1);
            }
            3
        };
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let mut state = 0u8;
        let mut buf = [0u8; 16];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                state = buf[n as usize - 1];
                continue;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break;
        }
        if state == b'M' {
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
        libc::_exit(0)
    }
}

/// Detaches a mount (`umount2(MNT_DETACH)`), for clean-up of a mount whose session
/// has already gone.
pub fn umount_detach(mountpoint: &Path) -> io::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mountpoint has a NUL"))?;
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
