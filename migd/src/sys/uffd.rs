//! userfaultfd and PAGEMAP_SCAN, as thin wrappers (constants and structs in
//! [`super::kabi`]).
//!
//! A userfaultfd belongs to the mm of the process that created it: to watch another
//! process, inject `userfaultfd(2)` into it and take the fd with `pidfd_getfd`. Every
//! ioctl below acts on the fd's own mm, whichever process calls it, so migd can
//! register, write-protect and fill a target's memory from outside.
//!
//! When the last reference to a userfaultfd closes, the kernel unregisters its areas:
//! missing anonymous pages then read as zeros. Whoever serves faults must keep a
//! reference alive for as long as any page is missing.

use super::{check, kabi};
use nix::errno::Errno;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// ioctl with a pointer to a live, correctly sized struct.
///
/// # Safety
/// `arg` must point to a valid value of the struct type `req` encodes.
unsafe fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: *mut T) -> Result<libc::c_long, Errno> {
    // SAFETY: forwarded to the caller (struct matches the request's size and layout).
    check(unsafe { libc::ioctl(fd, req as libc::c_ulong, arg) } as libc::c_long)
}

/// One event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread faulted at `addr` (page-aligned by the caller if needed).
    PageFault { addr: u64, write: bool, wp: bool },
    /// The process called fork (only with `UFFD_FEATURE_EVENT_FORK`); `fd` is a new
    /// userfaultfd for the child, installed in the reader's fd table.
    Fork { fd: RawFd },
    /// mremap moved `[from, from+len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// madvise(DONTNEED/REMOVE) dropped `[start, end)`: those pages are zeros now.
    Remove { start: u64, end: u64 },
    /// munmap of `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// Anything else (the raw event byte).
    Other(u8),
}

impl UffdEvent {
    fn from_msg(m: &kabi::UffdMsg) -> UffdEvent {
        match m.event {
            kabi::UFFD_EVENT_PAGEFAULT => UffdEvent::PageFault {
                addr: m.arg[1],
                write: m.arg[0] & kabi::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: m.arg[0] & kabi::UFFD_PAGEFAULT_FLAG_WP != 0,
            },
            kabi::UFFD_EVENT_FORK => UffdEvent::Fork {
                fd: m.arg[0] as u32 as RawFd,
            },
            kabi::UFFD_EVENT_REMAP => UffdEvent::Remap {
                from: m.arg[0],
                to: m.arg[1],
                len: m.arg[2],
            },
            kabi::UFFD_EVENT_REMOVE => UffdEvent::Remove {
                start: m.arg[0],
                end: m.arg[1],
            },
            kabi::UFFD_EVENT_UNMAP => UffdEvent::Unmap {
                start: m.arg[0],
                end: m.arg[1],
            },
            e => UffdEvent::Other(e),
        }
    }
}

/// A userfaultfd (ours, or one taken from another process with pidfd_getfd).
#[derive(Debug)]
pub struct Uffd(OwnedFd);

impl Uffd {
    /// Creates a userfaultfd for the calling process's own mm (tests; the engine
    /// injects the syscall into its target instead).
    pub fn create_own(flags: u64) -> Result<Uffd, Errno> {
        // SAFETY: userfaultfd takes only an integer flag word and returns a new fd.
        let r = check(unsafe { libc::syscall(kabi::SYS_USERFAULTFD, flags) })?;
        // SAFETY: the kernel just returned this fd; nobody else owns it.
        Ok(Uffd(unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as RawFd)
        }))
    }

    /// Wraps an fd known to be a userfaultfd.
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd(fd)
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.0
    }

    /// UFFDIO_API handshake asking for `features`; returns the features granted.
    /// Must be the first ioctl on a new userfaultfd (and is allowed once).
    pub fn api(&self, features: u64) -> Result<u64, Errno> {
        let mut a = kabi::UffdioApi {
            api: kabi::UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `a` is a live uffdio_api, the struct UFFDIO_API takes.
        unsafe { ioctl_ptr(self.fd(), kabi::UFFDIO_API, &mut a) }?;
        Ok(a.features)
    }

    /// Registers `[start, start+len)` in `mode` (`UFFDIO_REGISTER_MODE_*`); returns
    /// the ioctls allowed on the range.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
        let mut r = kabi::UffdioRegister {
            range: kabi::UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: `r` is a live uffdio_register.
        unsafe { ioctl_ptr(self.fd(), kabi::UFFDIO_REGISTER, &mut r) }?;
        Ok(r.ioctls)
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = kabi::UffdioRange { start, len };
        // SAFETY: `r` is a live uffdio_range.
        unsafe { ioctl_ptr(self.fd(), kabi::UFFDIO_UNREGISTER, &mut r) }.map(drop)
    }

    /// Write-protects (`wp`) or un-protects `[start, start+len)`.
    pub fn writeprotect(&self, start: u64, len: u64, wp: bool) -> Result<(), Errno> {
        let mut w = kabi::UffdioWriteprotect {
            range: kabi::UffdioRange { start, len },
            mode: if wp {
                kabi::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: `w` is a live uffdio_writeprotect.
        unsafe { ioctl_ptr(self.fd(), kabi::UFFDIO_WRITEPROTECT, &mut w) }.map(drop)
    }

    /// Copies `src` to `dst` in the fd's mm (atomically fills missing pages) and wakes
    /// the threads waiting there unless `dontwake`. `dst` and `src.len()` must be
    /// page-aligned. Returns the bytes copied; on a partial copy the error says why
    /// (EEXIST: a page is already there; EAGAIN: the layout changed, retry; ENOENT:
    /// not registered / gone; ESRCH: the process is gone) and `Err((copied, errno))`.
    pub fn copy(&self, dst: u64, src: &[u8], dontwake: bool) -> Result<u64, (u64, Errno)> {
        let mut c = kabi::UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if dontwake {
                kabi::UFFDIO_COPY_MODE_DONTWAKE
            } else {
                0
            },
            copy: 0,
        };
        // SAFETY: `c` is a live uffdio_copy; `src` is readable for `len` bytes for
        // the duration of the call.
        match unsafe { ioctl_ptr(self.fd(), kabi::UFFDIO_COPY, &mut c) } {
            Ok(_) => Ok(c.copy.max(0) as u64),
            Err(e) => Err((c.copy.max(0) as u64, e)),
        }
    }

    /// Maps zero pages over missing pages of `[start, start+len)` and wakes waiters.
    pub fn zeropage(&self, start: u64, len: u64) -> Result<u64, (u64, Errno)> {
        let mut z = kabi::UffdioZeropage {
            range: kabi::UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: `z` is a live uffdio_zeropage.
        match unsafe { ioctl_ptr(self.fd(), kabi::UFFDIO_ZEROPAGE, &mut z) } {
            Ok(_) => Ok(z.zeropage.max(0) as u64),
            Err(e) => Err((z.zeropage.max(0) as u64, e)),
        }
    }

    /// Wakes the threads waiting on faults in `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = kabi::UffdioRange { start, len };
        // SAFETY: `r` is a live uffdio_range.
        unsafe { ioctl_ptr(self.fd(), kabi::UFFDIO_WAKE, &mut r) }.map(drop)
    }

    /// Reads one event; `None` if none is queued (the fd must be O_NONBLOCK) .
    pub fn read_event(&self) -> Result<Option<UffdEvent>, Errno> {
        let mut m = kabi::UffdMsg::default();
        let n = std::mem::size_of::<kabi::UffdMsg>();
        // SAFETY: `m` is a live, writable uffd_msg of `n` bytes.
        let r = unsafe { libc::read(self.fd(), &mut m as *mut kabi::UffdMsg as *mut _, n) };
        if r == -1 {
            return match Errno::last() {
                Errno::EAGAIN => Ok(None),
                e => Err(e),
            };
        }
        if r as usize != n {
            return Err(Errno::EIO);
        }
        Ok(Some(UffdEvent::from_msg(&m)))
    }

    /// Waits up to `timeout_ms` (-1: forever) for an event; true if one is readable.
    pub fn wait_readable(&self, timeout_ms: i32) -> Result<bool, Errno> {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let r = check(unsafe { libc::poll(&mut p, 1, timeout_ms) } as libc::c_long)?;
        Ok(r > 0 && p.revents & libc::POLLIN != 0)
    }
}

impl Uffd {
    /// [`read_event`](Self::read_event), with the userfaultfd of a `Fork` event
    /// owned (the kernel installed it in our fd table when the event was read).
    pub fn read_event_owned(&self) -> Result<Option<(UffdEvent, Option<Uffd>)>, Errno> {
        Ok(self.read_event()?.map(|ev| match ev {
            UffdEvent::Fork { fd } => {
                // SAFETY: the kernel created this fd for us while we read the event;
                // nothing else knows its number, so this is its only owner.
                let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                (ev, Some(Uffd(owned)))
            }
            ev => (ev, None),
        }))
    }
}

/// poll(2) for input on `fds` for up to `timeout_ms` (-1: forever); per fd, whether
/// it is readable or hung up / in error. A closed number reads as ready (POLLNVAL).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> Result<Vec<bool>, Errno> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a live array of `p.len()` pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
        if r == -1 && Errno::last() == Errno::EINTR {
            continue;
        }
        check(r as libc::c_long)?;
        return Ok(p.iter().map(|x| x.revents != 0).collect());
    }
}

/// Receives one message and the descriptors passed with it (SCM_RIGHTS, close-on-exec)
/// from a unix socket; `(0, [])` at the end of the stream.
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    nonblock: bool,
) -> Result<(usize, Vec<OwnedFd>), Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblock {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let r = recvmsg::<()>(sock, &mut iov, Some(&mut space), flags)?;
    let mut fds = Vec::new();
    for c in r.cmsgs()? {
        if let ControlMessageOwned::ScmRights(v) = c {
            for fd in v {
                // SAFETY: the kernel installed these fds in our table for this
                // message; nobody else has their numbers yet.
                fds.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
    }
    Ok((r.bytes, fds))
}

/// PAGEMAP_SCAN on an open `/proc/PID/pagemap` over `[start, end)`: appends the
/// matching regions to `out` and returns where the walk stopped (`end` when it went
/// through; earlier when `out`'s spare room or `max_pages` ran out: call again from
/// there). A page matches when all `required` categories are set (after inverting
/// `inverted`) and, if `anyof` is non-zero, at least one of `anyof`; the categories
/// `also` do not choose pages but are reported in each region's `categories` too
/// (regions split where they differ). With `PM_SCAN_WP_MATCHING` the matching pages
/// are write-protected in the same walk.
#[allow(clippy::too_many_arguments)]
pub fn pagemap_scan(
    pagemap: RawFd,
    start: u64,
    end: u64,
    flags: u64,
    required: u64,
    inverted: u64,
    anyof: u64,
    also: u64,
    max_pages: u64,
    out: &mut Vec<kabi::PageRegion>,
) -> Result<u64, Errno> {
    if out.capacity() - out.len() < 64 {
        out.reserve(1024);
    }
    let room = out.capacity() - out.len();
    // The first spare slot of `out`; `wrapping_add` keeps this free of unsafe (the
    // result stays inside the allocation: len <= capacity).
    let spare = out.as_mut_ptr().wrapping_add(out.len()) as u64;
    let mut arg = kabi::PmScanArg {
        size: std::mem::size_of::<kabi::PmScanArg>() as u64,
        flags,
        start,
        end,
        walk_end: 0,
        vec: spare,
        vec_len: room as u64,
        max_pages,
        category_inverted: inverted,
        category_mask: required | inverted,
        category_anyof_mask: anyof,
        return_mask: required | anyof | inverted | also,
    };
    // SAFETY: `arg` is a live pm_scan_arg; `vec` points at `room` writable
    // page_region slots of `out`'s spare capacity.
    let n = unsafe { ioctl_ptr(pagemap, kabi::PAGEMAP_SCAN, &mut arg) }? as usize;
    let n = n.min(room);
    // SAFETY: the kernel initialised the first `n` spare slots.
    unsafe { out.set_len(out.len() + n) };
    Ok(arg.walk_end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dirty tracking on our own memory: every page is "written" at first; after a
    /// scan that write-protects them, only the pages written since are reported.
    #[test]
    fn pagemap_scan_reports_exactly_the_pages_written_since_the_last_scan() {
        let ps = 4096u64;
        let n = 64u64;
        let mut buf = vec![0u8; ((n + 1) * ps) as usize];
        let base = (buf.as_mut_ptr() as u64 + ps - 1) & !(ps - 1);
        let uffd = Uffd::create_own(
            (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | kabi::UFFD_USER_MODE_ONLY,
        )
        .expect("userfaultfd");
        let want = kabi::UFFD_FEATURE_WP_ASYNC | kabi::UFFD_FEATURE_WP_UNPOPULATED;
        assert_eq!(uffd.api(want).expect("api") & want, want);
        // Registration needs whole areas or page ranges inside them: fine for a heap block.
        uffd.register(base, n * ps, kabi::UFFDIO_REGISTER_MODE_WP)
            .expect("register");
        uffd.writeprotect(base, n * ps, true).expect("wp");
        for i in [3u64, 17, 40] {
            // SAFETY: inside `buf`.
            unsafe { *((base + i * ps) as *mut u8) = 1 };
        }
        let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
        let scan = |out: &mut Vec<kabi::PageRegion>| {
            pagemap_scan(
                pm.as_raw_fd(),
                base,
                base + n * ps,
                kabi::PM_SCAN_WP_MATCHING | kabi::PM_SCAN_CHECK_WPASYNC,
                kabi::PAGE_IS_WRITTEN,
                0,
                0,
                0,
                0,
                out,
            )
            .expect("scan")
        };
        let mut out = Vec::new();
        assert_eq!(scan(&mut out), base + n * ps);
        let pages: Vec<u64> = out
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(ps as usize))
            .map(|a| (a - base) / ps)
            .collect();
        assert_eq!(pages, vec![3, 17, 40]);
        out.clear();
        scan(&mut out);
        assert!(out.is_empty(), "nothing written since: {out:?}");
        uffd.unregister(base, n * ps).unwrap();
        drop(buf);
    }
}
