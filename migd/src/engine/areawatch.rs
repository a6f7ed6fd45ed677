//! Proof that a process's memory areas kept their flags over a window, without
//! reading smaps again.
//!
//! A dump takes the areas' VmFlags (MADV_DONTFORK, MADV_WIPEONFORK, mlock, ...) from
//! an smaps read made while the process still ran (`dump::EarlyLayout`): reading
//! smaps walks every page table, 40–60 ms at 4 GiB, too long for the freeze. A flag
//! can change without the area's line in /proc/PID/maps changing, so what the early
//! read said must still hold when the process is frozen. [`AreaWatch`] proves it
//! cheaply: from just before the early read until the freeze it counts, on every
//! thread, the entries to and returns from each system call that can change an
//! area's flags or make, move or remove areas, or make threads or children that
//! could ([`CALLS`]). None counted and no thread it did not watch: the early flags
//! are the flags now. Otherwise the dump reads smaps again (`dump::FlagsCheck`).
//!
//! Counting entries and returns both covers every call that overlaps the window:
//! one begun before the watch started is counted when it returns, which it does
//! before the thread stops for the freeze (ptrace stops come after the syscall-exit
//! tracepoint). No other process can change these flags: `process_madvise` takes
//! only advice that leaves them (COLD, PAGEOUT, WILLNEED, COLLAPSE).
//!
//! The counters are perf events on the `raw_syscalls:sys_enter`/`sys_exit`
//! tracepoints, filtered by syscall number in the kernel (`sys::perf`). While one is
//! open the kernel takes the traced path for every system call on the machine
//! (measured here: 77 → 131 ns for getppid); the window lasts tens of milliseconds.

use crate::sys;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::OnceLock;

/// The system calls counted (x86-64 numbers): those that change an area's flags
/// (madvise, mlock and friends, mseal, prctl's PR_SET_MEMORY_MERGE, userfaultfd
/// registration), make, move or remove areas (a twin of an area made again at the
/// same place has the same maps line but maybe other flags), run memory calls out of
/// sight (io_uring), replace the address space (exec), or make threads and children
/// (which share the address space or could, unwatched).
pub const CALLS: &[(libc::c_long, &str)] = &[
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_shmat, "shmat"),
    (libc::SYS_shmdt, "shmdt"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_mlock, "mlock"),
    (libc::SYS_munlock, "munlock"),
    (libc::SYS_mlockall, "mlockall"),
    (libc::SYS_munlockall, "munlockall"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_arch_prctl, "arch_prctl"),
    (libc::SYS_remap_file_pages, "remap_file_pages"),
    (libc::SYS_mbind, "mbind"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_mlock2, "mlock2"),
    (libc::SYS_pkey_mprotect, "pkey_mprotect"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_process_madvise, "process_madvise"),
    (libc::SYS_set_mempolicy_home_node, "set_mempolicy_home_node"),
    (sys::kabi::SYS_MAP_SHADOW_STACK, "map_shadow_stack"),
    (libc::SYS_mseal, "mseal"),
];

/// Counters of [`CALLS`] on each thread of a process, from [`AreaWatch::start`].
pub struct AreaWatch {
    pid: i32,
    /// Each thread watched with its counters of entries and of returns.
    threads: Vec<(i32, OwnedFd, OwnedFd)>,
}

impl std::fmt::Debug for AreaWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AreaWatch")
            .field("pid", &self.pid)
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl AreaWatch {
    /// Starts counting on every thread of `pid`. An error (no tracefs, no perf
    /// events, a thread gone meanwhile) says why; the caller then reads smaps again
    /// at the freeze, as without a watch.
    pub fn start(pid: i32) -> Result<AreaWatch, String> {
        let (enter, exit) = raw_syscall_tracepoints()?;
        let filter = filter();
        let tids = super::freeze::list_tids(pid).map_err(|e| e.to_string())?;
        let mut threads = Vec::with_capacity(tids.len());
        for tid in tids {
            let open = |id| {
                sys::perf::tracepoint_counter(tid, id, filter)
                    .map_err(|e| format!("perf_event_open on thread {tid}: {e}"))
            };
            threads.push((tid, open(enter)?, open(exit)?));
        }
        Ok(AreaWatch { pid, threads })
    }

    /// With the process frozen, before the dump runs anything in it: `Ok` if none of
    /// [`CALLS`] was entered or returned from since [`AreaWatch::start`] and every
    /// thread of `tids` (the frozen threads) was watched; otherwise what was seen.
    pub fn quiet(&self, tids: &[i32]) -> Result<(), String> {
        if let Some(t) = tids
            .iter()
            .find(|t| !self.threads.iter().any(|w| w.0 == **t))
        {
            return Err(format!("thread {t} was not watched (new?)"));
        }
        for (tid, enter, exit) in &self.threads {
            let count = |fd| {
                sys::perf::read_counter(fd)
                    .map_err(|e| format!("reading the counter of thread {tid}: {e}"))
            };
            let n = count(enter)? + count(exit)?;
            if n > 0 {
                return Err(format!(
                    "thread {tid} entered or left {n} system calls that can change memory areas"
                ));
            }
        }
        Ok(())
    }
}

impl Drop for AreaWatch {
    /// Closing the last counter of a tracepoint unregisters it, 35–45 ms here
    /// (RCU grace periods): done on a thread of its own, off the freeze.
    fn drop(&mut self) {
        let threads = std::mem::take(&mut self.threads);
        if !threads.is_empty() {
            let _ = std::thread::Builder::new()
                .name("areawatch-close".into())
                .spawn(move || drop(threads));
        }
    }
}

/// The ftrace filter selecting [`CALLS`] by number.
fn filter() -> &'static CString {
    static FILTER: OnceLock<CString> = OnceLock::new();
    FILTER.get_or_init(|| {
        let f = CALLS
            .iter()
            .map(|(nr, _)| format!("id == {nr}"))
            .collect::<Vec<_>>()
            .join(" || ");
        CString::new(f).expect("no NUL in a filter of numbers")
    })
}

/// The ids of the `raw_syscalls:sys_enter` and `sys_exit` tracepoints (fixed for
/// the boot: looked up once per process).
fn raw_syscall_tracepoints() -> Result<(u64, u64), String> {
    static IDS: OnceLock<Result<(u64, u64), String>> = OnceLock::new();
    IDS.get_or_init(|| {
        let ids = find_raw_syscall_tracepoints();
        match &ids {
            Ok((enter, exit)) => tracing::debug!(enter, exit, "syscall tracepoints"),
            Err(e) => tracing::info!(
                "no syscall tracepoints ({e}): each freeze reads smaps again to check \
                 the memory areas' flags"
            ),
        }
        ids
    })
    .clone()
}

fn find_raw_syscall_tracepoints() -> Result<(u64, u64), String> {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if let Ok(ids) = read_ids(Path::new(root)) {
            return Ok(ids);
        }
    }
    // tracefs is not mounted (no systemd here): mount it on a directory of our own
    // just long enough to read the two ids.
    let dir = std::env::temp_dir().join(format!("ferry-tracefs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("a directory to mount tracefs on, {}: {e}", dir.display()))?;
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let ids = mount(
        Some("tracefs"),
        &dir,
        Some("tracefs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting tracefs on {}: {e}", dir.display()))
    .and_then(|()| {
        let ids = read_ids(&dir);
        if let Err(e) = umount2(&dir, MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting tracefs from {}: {e}", dir.display());
        }
        ids
    });
    let _ = std::fs::remove_dir(&dir);
    ids
}

fn read_ids(root: &Path) -> Result<(u64, u64), String> {
    let id = |event: &str| {
        let p = root.join("events/raw_syscalls").join(event).join("id");
        std::fs::read_to_string(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    Ok((id("sys_enter")?, id("sys_exit")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::freeze::Frozen;
    use crate::engine::testproc::Py;

    /// A python3 that does what each line says: `getpid` a thousand times,
    /// `madvise` (DONTFORK) or `mlock` a page of an area, or start and join a
    /// `thread`.
    fn doer() -> Py {
        let mut p = Py::start(
            "import mmap,os,threading,ctypes\n\
             m=mmap.mmap(-1,1<<20,flags=mmap.MAP_PRIVATE)\n\
             libc=ctypes.CDLL(None,use_errno=True)",
            " if l=='getpid':\n\
             \x20\x20for _ in range(1000): os.getpid()\n\
             \x20if l=='madvise': m.madvise(mmap.MADV_DONTFORK)\n\
             \x20if l=='mlock':\n\
             \x20\x20a=ctypes.c_void_p.from_buffer(m)\n\
             \x20\x20libc.mlock(ctypes.addressof(a),4096)\n\
             \x20\x20del a\n\
             \x20if l=='thread':\n\
             \x20\x20t=threading.Thread(target=lambda:None); t.start(); t.join()",
        );
        // The interpreter's first lines settle its own allocations.
        for _ in 0..3 {
            p.tell("getpid");
        }
        p
    }

    /// Watches while `what` is done, then freezes: the watch's answer.
    fn watched(p: &mut Py, what: &str) -> Result<(), String> {
        let watch = AreaWatch::start(p.pid()).expect("syscall tracepoints on this machine");
        p.tell(what);
        let frozen = Frozen::freeze(p.pid()).unwrap();
        let tids: Vec<i32> = frozen.threads.iter().map(|t| t.tid).collect();
        watch.quiet(&tids)
    }

    /// Other system calls (reads, writes, getpid) leave the watch quiet; a
    /// madvise, an mlock or a thread made in the window are each seen, and the
    /// process runs on unharmed after each freeze.
    #[test]
    fn the_watch_sees_calls_that_can_change_memory_areas_and_only_those() {
        let mut p = doer();
        assert_eq!(watched(&mut p, "getpid"), Ok(()));
        for what in ["madvise", "mlock", "thread"] {
            let e = watched(&mut p, what).expect_err(what);
            // A thread joined in python may still be leaving the kernel when the
            // freeze comes: then it is seen as a thread not watched, as it should.
            let unwatched = what == "thread" && e.contains("not watched");
            assert!(
                e.contains("system calls that can change") || unwatched,
                "{what}: {e}"
            );
        }
        // Quiet again afterwards. The interpreter may hand an emptied arena back
        // (munmap) at any line after the thread's objects are gone, which the watch
        // rightly sees: a few tries, one of them quiet.
        let tries: Vec<Result<(), String>> = (0..3).map(|_| watched(&mut p, "getpid")).collect();
        assert!(tries.iter().any(|t| t.is_ok()), "{tries:?}");
    }

    /// A thread the watch did not start on is never taken as quiet.
    #[test]
    fn a_thread_not_watched_is_not_quiet() {
        let mut p = doer();
        let watch = AreaWatch::start(p.pid()).unwrap();
        p.tell("getpid");
        let mut tids: Vec<i32> = watch.threads.iter().map(|t| t.0).collect();
        assert_eq!(watch.quiet(&tids), Ok(()));
        tids.push(i32::MAX);
        let e = watch.quiet(&tids).unwrap_err();
        assert!(e.contains("not watched"), "{e}");
    }

    /// Every call is in the filter, and the filter is what the kernel takes.
    #[test]
    fn the_filter_names_every_call() {
        let f = filter().to_str().unwrap();
        for (nr, name) in CALLS {
            assert!(f.contains(&format!("id == {nr}")), "{name}");
        }
        let mut nrs: Vec<_> = CALLS.iter().map(|c| c.0).collect();
        nrs.sort();
        nrs.dedup();
        assert_eq!(nrs.len(), CALLS.len(), "a call listed twice");
    }
}
