//! `migd restore`: rebuild a process from an image and let it run.
//!
//! A child of a reaping stub (pid 1 of a new pid namespace) is created with its old
//! pid, then shaped from outside by injected system calls (see [`crate::engine::inject`]):
//! memory ([`memory`]), fds ([`files`]), signals, threads with their old tids, and
//! finally registers. The gadget page is unmapped last, from a syscall-exit stop.

pub mod files;
pub mod into;
pub mod lazy;
pub mod memory;
pub mod spawn;
pub mod warm;

use super::freeze::{FreezeError, StopKind, Stopped};
use super::image::{self, AreaKind, Caps, Manifest};
use super::inject::{InjectError, Injector};
use super::maps::parse_smaps;
use super::regs;
use crate::sys::{self, kabi};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Instant;

const GADGET_LEN: u64 = 64 * 1024;
const SCRATCH_PATH_OFF: u64 = 32 * 1024;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub images: PathBuf,
    pub detach: bool,
    /// The manifest's bytes if they were handed over (see
    /// `image::manifest_from`); `None`: read from `images`.
    pub manifest: Option<Vec<u8>>,
    /// A lazy restore's eager pages if they were handed over (encoded
    /// `image::EagerPages`): no chunk of pages.img is read for the runs they hold.
    pub eager: Option<Vec<u8>>,
    /// pages.img's first bytes if they were read while pre-copy ran (see [`warm`]):
    /// a lazy restore's pager takes the chunks it holds from there.
    pub warm: warm::Handed,
    /// Give each pipe with one end outside the process
    /// ([`Manifest::outside_pipes`]) a new pipe whose other end stays with the
    /// caller (see [`RestoreReport::relays`]), instead of a pipe nobody else holds.
    pub relay_pipes: bool,
    /// With `relay_pipes`: put the bytes the image holds for a pipe the process
    /// reads into its new pipe (the image was dumped at a host, where they had been
    /// relayed from home already). Not for an image dumped at home: those bytes are
    /// still in the pipe there.
    pub refill_relayed_input: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// The pid the process sees (its old pid).
    pub pid: i32,
    /// The same process as the caller's pid namespace sees it.
    pub outer_pid: i32,
    /// The namespace's init stub, as the caller sees it.
    pub stub_pid: i32,
    pub threads: usize,
    pub areas: usize,
    pub page_bytes: u64,
    pub fds: usize,
    pub restore_ms: f64,
    /// Lazy restore: image bytes left to fault in when the process started running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_bytes: Option<u64>,
    /// Lazy restore: the stub's copy of the process's userfaultfd (its fd number in
    /// the stub), for [`lazy::Pager::resume`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uffd_stub_fd: Option<i32>,
    /// With [`RestoreOptions::relay_pipes`]: each relayed pipe, and the fd number
    /// of its other end in the caller. Those ends stay open in the caller (whoever
    /// relays the bytes uses a copy of them) until it closes them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<Relayed>,
}

/// A relayed pipe (see [`RestoreReport::relays`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Relayed {
    /// The process's end: its lowest fd naming it, and whether it writes.
    pub pipe: image::OutsidePipe,
    /// The other end's fd number in the caller.
    pub end: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("refusing to restore: {what}; nothing was created")]
    Refused { what: String },
    #[error("creating the process: {what}")]
    Spawn { what: String },
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("restore: {what}")]
    Other { what: String },
}

/// The process being shaped and the means to run syscalls in it.
pub struct Ctx {
    pub pid: i32,
    pub leader: Stopped,
    pub inj: Injector,
    pub gadget: u64,
    pub gadget_len: u64,
    pub inherit: Vec<(i32, String)>,
    /// memfds recreated for the image, by inode: their fd in the process (kept high).
    pub memfds: std::cell::RefCell<std::collections::BTreeMap<u64, i32>>,
}

impl Ctx {
    fn scratch(&self) -> u64 {
        self.gadget + 4096
    }
    /// Writes bytes into the scratch area at `off`; returns their address there.
    pub fn put(&self, off: u64, bytes: &[u8]) -> Result<u64, RestoreError> {
        let addr = self.scratch() + off;
        sys::vm_write(self.pid, addr, bytes).map_err(|e| RestoreError::Other {
            what: format!("writing scratch: {e}"),
        })?;
        Ok(addr)
    }
    pub fn ok(&self, t: &Stopped, nr: i64, args: &[u64], what: &str) -> Result<i64, RestoreError> {
        Ok(self.inj.ok(t, nr, args, || what.to_string())?)
    }
    /// openat(AT_FDCWD, path, flags, mode) inside the process.
    pub fn open(
        &self,
        t: &Stopped,
        path: &str,
        flags: i32,
        mode: u32,
    ) -> Result<i32, RestoreError> {
        let mut b = path.as_bytes().to_vec();
        b.push(0);
        let addr = self.put(SCRATCH_PATH_OFF, &b)?;
        Ok(self.ok(
            t,
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, addr, flags as u64, mode as u64],
            &format!("open({path})"),
        )? as i32)
    }
}

/// A free range of `len` bytes: outside every image area, this process's own areas
/// and `extra`.
pub fn free_hole(
    areas: &[image::Area],
    len: u64,
    extra: &[(u64, u64)],
) -> Result<u64, RestoreError> {
    let own = parse_smaps(&std::fs::read_to_string("/proc/self/maps").unwrap_or_default())
        .unwrap_or_default();
    let mut busy: Vec<(u64, u64)> = areas
        .iter()
        .map(|a| {
            (
                a.start
                    .saturating_sub(if a.growsdown { 64 << 20 } else { 0 }),
                a.end,
            )
        })
        .collect();
    busy.extend(own.iter().map(|a| (a.start, a.end)));
    busy.extend_from_slice(extra);
    let margin = 1 << 20;
    let mut cand: u64 = 0x1000_0000;
    while cand < 0x7f00_0000_0000 {
        if busy
            .iter()
            .all(|&(s, e)| cand + len + margin <= s || cand >= e + margin)
        {
            return Ok(cand);
        }
        cand += 0x1000_0000;
    }
    Err(RestoreError::Other {
        what: "no free address range for the restore gadget".into(),
    })
}

fn precheck(m: &Manifest) -> Result<(), RestoreError> {
    let refuse = |what: String| Err(RestoreError::Refused { what });
    if m.pid <= 1 {
        return refuse(format!(
            "the image's pid is {}; an init process cannot be restored",
            m.pid
        ));
    }
    if m.xsave_len != 0 && m.xsave_len != sys::xsave_size() {
        return refuse(format!(
            "the image's XSAVE area is {} bytes, this CPU's is {} (different CPU features)",
            m.xsave_len,
            sys::xsave_size()
        ));
    }
    memory::check_vdso_layout(m)?;
    let files: std::collections::BTreeSet<&str> = m
        .areas
        .iter()
        .filter_map(|a| match &a.kind {
            AreaKind::File { path, .. } => Some(path.as_str()),
            _ => None,
        })
        .collect();
    let seen = stat_all(files.into_iter().collect())?;
    for a in &m.areas {
        if let AreaKind::File {
            path,
            size,
            mtime,
            mtime_nsec,
        } = &a.kind
        {
            let md = &seen[path.as_str()];
            if !a.shared
                && (md.size() != *size || md.mtime() != *mtime || md.mtime_nsec() != *mtime_nsec)
            {
                return refuse(format!(
                    "mapped file {path} changed since the dump (size or mtime differ)"
                ));
            }
        }
    }
    Ok(())
}

/// At most this many stats at once in [`stat_all`].
const STATS_AT_ONCE: usize = 8;

/// The metadata of each path, asked for in parallel: a file of the home view is
/// a round trip to its node's fs-server, and a process maps a few to a few dozen.
fn stat_all(paths: Vec<&str>) -> Result<HashMap<&str, std::fs::Metadata>, RestoreError> {
    let per_thread = paths.len().div_ceil(STATS_AT_ONCE).max(1);
    std::thread::scope(|s| {
        let threads: Vec<_> = paths
            .chunks(per_thread)
            .map(|some| {
                s.spawn(move || {
                    some.iter()
                        .map(|&p| {
                            std::fs::metadata(p).map(|md| (p, md)).map_err(|source| {
                                RestoreError::Io {
                                    path: p.to_string(),
                                    source,
                                }
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut out = HashMap::new();
        for t in threads {
            let got = t.join().map_err(|_| RestoreError::Other {
                what: "a thread checking the mapped files panicked".into(),
            })??;
            out.extend(got);
        }
        Ok(out)
    })
}

/// Restores the image. `running` is called once the process runs (with the report);
/// without `detach`, then waits for it and returns its raw wait status.
pub fn restore(
    opts: &RestoreOptions,
    running: impl FnOnce(&RestoreReport),
) -> Result<(RestoreReport, Option<i32>), RestoreError> {
    restore_inheriting(opts, &[], running)
}

/// [`restore`], with resources outside the image handed in by the caller: (our fd,
/// key), where key names the resource as the dump saw it, e.g. `pipe:[12345]`. The
/// restored process gets our fd in place of that resource (e.g. a pipe whose other
/// end stayed with the parent; its buffered data never left it).
pub fn restore_inheriting(
    opts: &RestoreOptions,
    inherit: &[(i32, String)],
    running: impl FnOnce(&RestoreReport),
) -> Result<(RestoreReport, Option<i32>), RestoreError> {
    let (report, link, _, _) = start(opts, None, inherit, false)?;
    running(&report);
    wait_restored(opts, report, link)
}

/// [`restore`], but the process is kept stopped (under our ptrace) once shaped:
/// `ready` is called with the report and says whether to let it run (true), after
/// which this waits for it as [`restore`] does; false kills it before it ever ran
/// (returned status `None`). A migration's restorer uses it so that the copy runs
/// only once the source committed (exactly one copy ever runs).
pub fn restore_paused(
    opts: &RestoreOptions,
    ready: impl FnOnce(&RestoreReport) -> bool,
) -> Result<(RestoreReport, Option<i32>), RestoreError> {
    let (report, link, _, paused) = start(opts, None, &[], true)?;
    let paused = paused.expect("a paused start returns the stopped threads");
    if !ready(&report) {
        paused.kill(report.stub_pid);
        return Ok((report, None));
    }
    paused.release()?;
    wait_restored(opts, report, link)
}

/// A restored process shaped and kept stopped under our ptrace, not run yet.
/// [`release`](Self::release) lets it run; [`kill`](Self::kill) ends it. Should we
/// die first, the kernel kills it (the threads were seized with PTRACE_O_EXITKILL).
pub struct Paused {
    threads: Vec<Stopped>,
    target: i32,
    /// It was stopped by job control when dumped.
    stopped: bool,
}

impl Paused {
    /// Lets the process run (stopped again if it was when dumped).
    pub fn release(self) -> Result<(), RestoreError> {
        for t in self.threads {
            t.detach()?;
        }
        if self.stopped {
            let _ = sys::kill(self.target, libc::SIGSTOP);
        }
        Ok(())
    }

    /// Kills the process before it ever ran: SIGKILL to `stub` (its pid namespace's
    /// init) and every child and tracee of ours reaped (the stub waits for its
    /// namespace, whose traced threads report to us first).
    pub fn kill(self, stub: i32) {
        let _ = sys::kill(stub, libc::SIGKILL);
        while sys::wait_tid(-1).is_ok() {}
    }
}

/// After the process runs: without `detach`, waits for it and returns its raw wait
/// status.
fn wait_restored(
    opts: &RestoreOptions,
    report: RestoreReport,
    link: Option<spawn::StubLink>,
) -> Result<(RestoreReport, Option<i32>), RestoreError> {
    if opts.detach {
        return Ok((report, None));
    }
    let status = link.and_then(|mut l| l.wait_status());
    let st = sys::wait_child(report.stub_pid).map_err(|e| RestoreError::Other {
        what: format!("waiting for the stub: {e}"),
    })?;
    Ok((report, Some(status.unwrap_or(st))))
}

/// A lazily restored process, running: its pages come in while the caller drives
/// `pager` ([`lazy::Pager::step`]); the stub reports the process's end on the
/// pager's link ([`lazy::Pager::link_mut`]).
pub struct LazyRestore {
    pub report: RestoreReport,
    pub pager: lazy::Pager,
}

/// Restores the image lazily (see [`lazy`]): returns once the process runs, with
/// its private anonymous pages still in pages.img; the caller must drive the pager
/// until it is done (or the process ends), or the process waits on its faults.
pub fn restore_lazy(
    opts: &RestoreOptions,
    lazy_opts: &lazy::LazyOptions,
    inherit: &[(i32, String)],
) -> Result<LazyRestore, RestoreError> {
    let (report, _, pager, _) = start(opts, Some(lazy_opts), inherit, false)?;
    Ok(LazyRestore {
        report,
        pager: pager.expect("a lazy start returns a pager"),
    })
}

/// [`restore_lazy`], but the process is kept stopped once shaped (see
/// [`restore_paused`]): the caller lets it run with [`Paused::release`] (the pager
/// serves it from then on) or kills it with [`Paused::kill`].
pub fn restore_lazy_paused(
    opts: &RestoreOptions,
    lazy_opts: &lazy::LazyOptions,
) -> Result<(LazyRestore, Paused), RestoreError> {
    let (report, _, pager, paused) = start(opts, Some(lazy_opts), &[], true)?;
    Ok((
        LazyRestore {
            report,
            pager: pager.expect("a lazy start returns a pager"),
        },
        paused.expect("a paused start returns the stopped threads"),
    ))
}

/// What [`start`] returns: the report, the stub link (eager), the pager (lazy), and
/// the process kept stopped (`hold`).
type Started = (
    RestoreReport,
    Option<spawn::StubLink>,
    Option<lazy::Pager>,
    Option<Paused>,
);

/// Creates and shapes the process and lets it run (with `hold`, keeps it stopped);
/// lazily with `lazy`.
fn start(
    opts: &RestoreOptions,
    lazy: Option<&lazy::LazyOptions>,
    inherit: &[(i32, String)],
    hold: bool,
) -> Result<Started, RestoreError> {
    let mut ph = crate::phases::Phases::new("restore");
    let given = opts.manifest.as_deref();
    let m = if lazy.is_some() {
        image::manifest_from(&opts.images, given)?
    } else {
        image::read_image_given(&opts.images, given)?
    };
    let _span = tracing::info_span!("restore", pid = m.pid, lazy = lazy.is_some()).entered();
    ph.mark("manifest");
    let plan = lazy.map(|_| lazy::plan(&m));
    // The checks (round trips for the mapped files) while the pages are read
    // (round trips to the store); a refusal still wins over any read error. Both
    // threads end here: the rest needs this thread alone (ptrace, fork).
    let (checked, pages) = std::thread::scope(|s| {
        let check = s.spawn(|| precheck(&m));
        let pages = read_pages(opts, &m, plan.as_ref());
        let checked = check.join().unwrap_or_else(|_| {
            Err(RestoreError::Other {
                what: "the pre-check panicked".into(),
            })
        });
        (checked, pages)
    });
    checked?;
    let pages = pages?;
    ph.mark("precheck + pages.img (lazy: eager chunks read)");
    let gadget = free_hole(&m.areas, GADGET_LEN, &[])?;
    let mut inherit = inherit.to_vec();
    let relay_pipes = match opts.relay_pipes {
        true => relay_pipes(&m, &mut inherit, opts.refill_relayed_input)?,
        false => Vec::new(),
    };
    let t0 = Instant::now();
    let sp = spawn::spawn(m.pid, gadget, GADGET_LEN as usize)?;
    ph.mark("spawn");
    // The process has its copies of its ends (fork); ours would keep the relayed
    // pipes from ever reaching their end.
    let relays: Vec<Relayed> = relay_pipes
        .into_iter()
        .map(|(pipe, theirs, ours)| {
            drop(theirs);
            Relayed {
                pipe,
                end: std::os::fd::IntoRawFd::into_raw_fd(ours),
            }
        })
        .collect();
    let ctx = Ctx {
        pid: sp.target,
        leader: sp.leader,
        inj: Injector { gadget },
        gadget,
        gadget_len: GADGET_LEN,
        inherit,
        memfds: Default::default(),
    };
    let shaped = (|| {
        let uffd = match &plan {
            Some(_) => Some(lazy::create_uffd(&ctx)?),
            None => None,
        };
        let shaping = plan.as_ref().map_or(&m, |p| &p.shaping);
        let threads = shape(&ctx, shaping, pages.bytes())?;
        Ok::<_, RestoreError>((threads, uffd))
    })();
    ph.mark("shape");
    let mut link = Some(sp.link);
    let mut pager = None;
    let mut lazy_bytes = None;
    let result = shaped.and_then(|(threads, uffd)| {
        if let (Some(uffd), Some(plan), Some(lo)) = (uffd, plan, lazy) {
            lazy_bytes = Some(plan.lazy_bytes());
            let l = link.take().expect("the stub link");
            let warm = opts.warm.take();
            let p = lazy::arm(&ctx, uffd, plan, &opts.images, &m, l, lo, warm)?;
            pager = Some(p);
        }
        Ok(threads)
    });
    let threads = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = sys::kill(sp.stub, libc::SIGKILL);
            // the target's threads are our tracees: reap them too,
            // or the stub (pid 1 of their namespace) waits for them forever, and we
            // for the stub.
            while sys::wait_tid(-1).is_ok() {}
            return Err(e);
        }
    };
    ph.mark("arm");
    // Released in this order: the other threads, then the leader (as before).
    let mut all = threads;
    all.push(ctx.leader);
    let paused = Paused {
        threads: all,
        target: sp.target,
        stopped: m.stopped,
    };
    let paused = match hold {
        true => Some(paused),
        false => {
            paused.release()?;
            None
        }
    };
    ph.mark("detach");
    ph.log();
    let report = RestoreReport {
        pid: m.pid,
        outer_pid: sp.target,
        stub_pid: sp.stub,
        threads: m.threads.len(),
        areas: m.areas.len(),
        page_bytes: m.pages_len,
        fds: m.fds.len(),
        restore_ms: t0.elapsed().as_secs_f64() * 1e3,
        lazy_bytes,
        uffd_stub_fd: pager.as_ref().and_then(|p: &lazy::Pager| p.stub_fd()),
        relays,
    };
    Ok((report, link, pager, paused))
}

/// A new pipe for each of the image's pipes with one end outside the process
/// ([`Manifest::outside_pipes`]), with the image's capacity: the process's end is
/// handed to it in place of the image's (added to `inherit`, so nothing is
/// refilled: the bytes buffered at the dump are still in the pipe outside), but
/// with `refill_input` the image's bytes of a pipe the process reads are put in.
/// Returns (the pipe, the process's end, the other end) for each.
fn relay_pipes(
    m: &Manifest,
    inherit: &mut Vec<(i32, String)>,
    refill_input: bool,
) -> Result<
    Vec<(
        image::OutsidePipe,
        std::os::fd::OwnedFd,
        std::os::fd::OwnedFd,
    )>,
    RestoreError,
> {
    let mut out = Vec::new();
    for pipe in m.outside_pipes() {
        let key = format!("pipe:[{}]", pipe.inode);
        if inherit.iter().any(|(_, k)| *k == key) {
            continue; // the caller hands this pipe in itself
        }
        let err = |what: String| RestoreError::Other {
            what: format!("fd {}: a pipe to relay: {what}", pipe.fd),
        };
        let (r, w) = sys::pipe().map_err(|e| err(e.to_string()))?;
        // The image's pipe: its capacity, and bytes only with the first fd naming it.
        let of_pipe = || {
            m.fds.iter().filter_map(|f| match &f.kind {
                image::FdKind::Pipe {
                    inode, size, data, ..
                } if *inode == pipe.inode => Some((*size, data.as_slice())),
                _ => None,
            })
        };
        let size = of_pipe().map(|(s, _)| s).max().unwrap_or(0);
        let data: &[u8] = of_pipe()
            .map(|(_, d)| d)
            .find(|d| !d.is_empty())
            .unwrap_or(&[]);
        if size > 0 {
            let _ = sys::set_pipe_size(w.as_raw_fd(), size);
        }
        if refill_input && !pipe.writes && !data.is_empty() {
            let n = sys::write_raw(w.as_raw_fd(), data);
            if n != data.len() as isize {
                return Err(err(format!("refilling: wrote {n} of {} bytes", data.len())));
            }
        }
        let (theirs, ours) = if pipe.writes { (w, r) } else { (r, w) };
        inherit.push((theirs.as_raw_fd(), key));
        out.push((pipe, theirs, ours));
    }
    Ok(out)
}

/// pages.img as the shaping reads it (see [`Pages`]).
fn read_pages(
    opts: &RestoreOptions,
    m: &Manifest,
    plan: Option<&lazy::Plan>,
) -> Result<Pages, RestoreError> {
    Ok(match plan {
        // Only the chunks the eager part reads, read in full and checked.
        Some(p) => {
            let given = match &opts.eager {
                Some(b) => Some(image::EagerPages::from_bytes(&opts.images, b)?),
                None => None,
            };
            Pages::Eager(lazy::read_eager_chunks(&opts.images, m, p, given.as_ref())?)
        }
        None => {
            let pages_path = opts.images.join(image::PAGES_FILE);
            let pages_file =
                std::fs::File::open(&pages_path).map_err(|source| RestoreError::Io {
                    path: pages_path.display().to_string(),
                    source,
                })?;
            Pages::Mapped(
                sys::FileMap::map(pages_file.as_raw_fd(), m.pages_len as usize).map_err(|e| {
                    RestoreError::Io {
                        path: pages_path.display().to_string(),
                        source: e.into(),
                    }
                })?,
            )
        }
    })
}

/// pages.img as the shaping reads it: mapped whole (an eager restore, which checked
/// it whole), or, for a lazy restore, only the chunks its eager part reads, in memory.
enum Pages {
    Mapped(sys::FileMap),
    Eager(sys::AnonMap),
}

impl Pages {
    fn bytes(&self) -> &[u8] {
        match self {
            Pages::Mapped(m) => m.bytes(),
            Pages::Eager(m) => m.bytes(),
        }
    }
}

/// Shapes the seized child into the image; returns the other threads, still stopped.
fn shape(ctx: &Ctx, m: &Manifest, pages: &[u8]) -> Result<Vec<Stopped>, RestoreError> {
    let mut ph = crate::phases::Phases::new("shape");
    let t = &ctx.leader;
    t.set_sigmask(!0)?;
    if let Ok((_, max)) = sys::prlimit_get(ctx.pid, libc::RLIMIT_NOFILE as i32) {
        let _ = sys::prlimit_set(ctx.pid, libc::RLIMIT_NOFILE as i32, max, max);
    }
    memory::rebuild(ctx, m, pages)?;
    ph.mark("memory");
    files::restore_fds(ctx, m, pages)?;
    ph.mark("fds");
    memory::finish_memfds(ctx, m)?;
    let mut cwd = m.cwd.as_bytes().to_vec();
    cwd.push(0);
    let a = ctx.put(SCRATCH_PATH_OFF, &cwd)?;
    ctx.ok(t, libc::SYS_chdir, &[a], &format!("chdir({})", m.cwd))?;
    // The paths above (fds, cwd) were recorded from outside the process's root, so
    // it is changed after them: chroot(2) leaves the working directory where it is.
    if m.root != "/" {
        let mut root = m.root.as_bytes().to_vec();
        root.push(0);
        let a = ctx.put(SCRATCH_PATH_OFF, &root)?;
        ctx.ok(t, libc::SYS_chroot, &[a], &format!("chroot({})", m.root))?;
    }
    ctx.ok(t, libc::SYS_umask, &[m.umask as u64], "umask")?;
    ctx.ok(t, libc::SYS_personality, &[m.personality], "personality")?;
    restore_sigactions(ctx, m)?;
    ph.mark("cwd+sigactions");

    // Threads, with their old tids.
    let mut others = Vec::new();
    for ti in &m.threads[1..] {
        let set_tid = ctx.put(256, &ti.tid.to_ne_bytes())?;
        let flags = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM;
        let args = kabi::CloneArgs {
            flags: flags as u64,
            set_tid,
            set_tid_size: 1,
            ..Default::default()
        };
        let words = [
            args.flags,
            args.pidfd,
            args.child_tid,
            args.parent_tid,
            args.exit_signal,
            args.stack,
            args.stack_size,
            args.tls,
            args.set_tid,
            args.set_tid_size,
            args.cgroup,
        ];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let a = ctx.put(0, &bytes)?;
        let out = ctx
            .inj
            .call(t, libc::SYS_clone3, &[a, bytes.len() as u64])?;
        if out.ret != ti.tid as i64 {
            return Err(RestoreError::Other {
                what: format!("clone3(set_tid=[{}]) returned {}", ti.tid, out.ret),
            });
        }
        let new = out.new_tid.ok_or_else(|| RestoreError::Other {
            what: format!("thread {}: no clone event", ti.tid),
        })?;
        let st = sys::wait_tid(new).map_err(|e| RestoreError::Other {
            what: format!("waiting for new thread {new}: {e}"),
        })?;
        match super::freeze::decode(new, st)? {
            StopKind::Event => {}
            _ => {
                return Err(RestoreError::Other {
                    what: format!("thread {}: unexpected first stop {st:#x}", ti.tid),
                })
            }
        }
        others.push(Stopped { tid: new });
    }
    let all: Vec<&Stopped> = std::iter::once(&ctx.leader).chain(others.iter()).collect();
    for (st, ti) in all.iter().zip(&m.threads) {
        per_thread(ctx, st, ti)?;
    }
    ph.mark("threads");
    // Pending signals, queued by the process to itself while everything is blocked.
    for info in &m.shared_pending {
        let sig = i32::from_ne_bytes(info[..4].try_into().unwrap());
        let a = ctx.put(0, info)?;
        ctx.ok(
            t,
            libc::SYS_rt_sigqueueinfo,
            &[m.pid as u64, sig as u64, a],
            "rt_sigqueueinfo",
        )?;
    }
    for ti in &m.threads {
        for info in &ti.pending {
            let sig = i32::from_ne_bytes(info[..4].try_into().unwrap());
            let a = ctx.put(0, info)?;
            ctx.ok(
                t,
                libc::SYS_rt_tgsigqueueinfo,
                &[m.pid as u64, ti.tid as u64, sig as u64, a],
                "rt_tgsigqueueinfo",
            )?;
        }
    }
    for &(res, cur, max) in &m.rlimits {
        sys::prlimit_set(ctx.pid, res, cur, max)
            .or_else(|e| set_rlimit_inside(ctx, res, cur, max, e))
            .map_err(|e| RestoreError::Other {
                what: format!("prlimit({res}): {e}"),
            })?;
    }
    restore_creds(ctx, m, &all)?;
    restore_prctl(ctx, m, &all)?;
    for (which, it) in m.itimers.iter().enumerate() {
        if it.iter().any(|&v| v != 0) {
            let mut it = *it;
            if it[2] == 0 && it[3] == 0 {
                // Expired with its signal still pending: the kernel would re-arm it when
                // the signal is taken; a zero value would disarm it instead.
                it[2] = it[0];
                it[3] = it[1];
            }
            let b: Vec<u8> = it.iter().flat_map(|v| v.to_ne_bytes()).collect();
            let a = ctx.put(0, &b)?;
            ctx.ok(t, libc::SYS_setitimer, &[which as u64, a, 0], "setitimer")?;
        }
    }
    restore_posix_timers(ctx, m)?;
    ph.mark("signals+limits+creds+timers");
    for (st, ti) in others.iter().zip(&m.threads[1..]) {
        final_regs(ctx, st, ti)?;
    }
    // Last: unmap the gadget from inside, stopping at the syscall exit.
    let mut r = t.regs()?;
    r.rip = ctx.gadget;
    r.rax = libc::SYS_munmap as u64;
    r.rdi = ctx.gadget;
    r.rsi = ctx.gadget_len;
    r.orig_rax = u64::MAX;
    t.set_regs(&r)?;
    for _ in 0..2 {
        match t.cont_and_wait(0, true)? {
            StopKind::Syscall => {}
            _ => {
                return Err(RestoreError::Other {
                    what: "unmapping the gadget: unexpected stop".into(),
                })
            }
        }
    }
    final_regs(ctx, t, &m.threads[0])?;
    ph.mark("regs+gadget");
    ph.log();
    Ok(others)
}

fn restore_sigactions(ctx: &Ctx, m: &Manifest) -> Result<(), RestoreError> {
    let t = &ctx.leader;
    let mut order: Vec<i32> = (1..=64)
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP && s != libc::SIGCHLD)
        .collect();
    order.push(libc::SIGCHLD);
    for sig in order {
        let (h, f, r, mask) = m
            .sigactions
            .iter()
            .find(|a| a.sig == sig)
            .map(|a| (a.handler, a.flags, a.restorer, a.mask))
            .unwrap_or((0, 0, 0, 0));
        let b: Vec<u8> = [h, f, r, mask]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let a = ctx.put(0, &b)?;
        ctx.ok(
            t,
            libc::SYS_rt_sigaction,
            &[sig as u64, a, 0, 8],
            &format!("rt_sigaction({sig})"),
        )?;
    }
    Ok(())
}

fn per_thread(ctx: &Ctx, t: &Stopped, ti: &image::ThreadImage) -> Result<(), RestoreError> {
    ctx.ok(
        t,
        libc::SYS_set_tid_address,
        &[ti.clear_tid],
        "set_tid_address",
    )?;
    if ti.robust_list.0 != 0 {
        ctx.ok(
            t,
            libc::SYS_set_robust_list,
            &[ti.robust_list.0, ti.robust_list.1],
            "set_robust_list",
        )?;
    }
    let (sp, flags, size) = ti.altstack;
    if flags & libc::SS_DISABLE == 0 && size != 0 {
        let mut b = Vec::new();
        b.extend_from_slice(&sp.to_ne_bytes());
        b.extend_from_slice(&((flags & !libc::SS_ONSTACK) as i64).to_ne_bytes());
        b.extend_from_slice(&size.to_ne_bytes());
        let a = ctx.put(512, &b)?;
        ctx.ok(t, libc::SYS_sigaltstack, &[a, 0], "sigaltstack")?;
    }
    let mut name = ti.name.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let a = ctx.put(768, &name)?;
    ctx.ok(
        t,
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, a],
        "prctl(PR_SET_NAME)",
    )?;
    if let Some(rs) = ti.rseq {
        ctx.ok(
            t,
            libc::SYS_rseq,
            &[rs.ptr, rs.len as u64, 0, rs.sig as u64],
            &format!("rseq(register {:#x}) in tid {}", rs.ptr, ti.tid),
        )?;
    }
    Ok(())
}

fn final_regs(ctx: &Ctx, t: &Stopped, ti: &image::ThreadImage) -> Result<(), RestoreError> {
    let mut r = regs::from_words(&ti.regs).ok_or_else(|| RestoreError::Other {
        what: format!("thread {}: bad register record", ti.tid),
    })?;
    regs::fix_for_restore(&mut r);
    if let Some(rs) = ti.rseq {
        // An IP inside an rseq critical section goes to its abort handler.
        let mut b = [0u8; 8];
        if sys::vm_read(ctx.pid, rs.ptr + 8, &mut b).is_ok() {
            let cs = u64::from_ne_bytes(b);
            let mut d = [0u8; 32];
            if cs != 0 && sys::vm_read(ctx.pid, cs, &mut d).is_ok() {
                let start = u64::from_ne_bytes(d[8..16].try_into().unwrap());
                let len = u64::from_ne_bytes(d[16..24].try_into().unwrap());
                let abort = u64::from_ne_bytes(d[24..32].try_into().unwrap());
                if r.rip >= start && r.rip < start + len {
                    r.rip = abort;
                }
            }
        }
    }
    let mut x = ti.xsave.clone();
    if x.len() >= 520 {
        // xstate_bv: keep the legacy x87/SSE state (incl. MXCSR) from the buffer.
        x[512] |= 3;
        t.set_xsave(&x)?;
    }
    t.set_regs(&r)?;
    t.set_sigmask(ti.sigmask)?;
    Ok(())
}

/// Credentials belong to each thread, and an injected setresuid is the raw system
/// call (not glibc's, which repeats it in every thread): so every thread gets them.
///
/// Capabilities: the bounding set is lowered first (that needs CAP_SETPCAP, which the
/// process has until its uid changes); a root process then gets its own permitted,
/// effective, inheritable and ambient sets back. (A process that is not root and holds
/// capabilities was refused at dump.)
fn restore_creds(ctx: &Ctx, m: &Manifest, threads: &[&Stopped]) -> Result<(), RestoreError> {
    let c = &m.creds;
    if let Some(caps) = &c.caps {
        restore_bounding_set(ctx, caps, threads)?;
    }
    if c.uid == [0, 0, 0] && c.gid == [0, 0, 0] {
        if let Some(caps) = &c.caps {
            restore_root_caps(ctx, caps, threads)?;
        }
        return Ok(());
    }
    let b: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
    for &t in threads {
        let a = ctx.put(0, &b)?;
        ctx.ok(
            t,
            libc::SYS_setgroups,
            &[c.groups.len() as u64, a],
            "setgroups",
        )?;
        ctx.ok(
            t,
            libc::SYS_setresgid,
            &[c.gid[0] as u64, c.gid[1] as u64, c.gid[2] as u64],
            "setresgid",
        )?;
        ctx.ok(
            t,
            libc::SYS_setresuid,
            &[c.uid[0] as u64, c.uid[1] as u64, c.uid[2] as u64],
            "setresuid",
        )?;
    }
    Ok(())
}

/// The highest capability number this kernel knows.
fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// Drops from every thread's bounding set what the image's lacks.
fn restore_bounding_set(ctx: &Ctx, caps: &Caps, threads: &[&Stopped]) -> Result<(), RestoreError> {
    for cap in 0..=cap_last_cap().min(63) {
        if caps.bounding & (1 << cap) == 0 {
            for &t in threads {
                ctx.ok(
                    t,
                    libc::SYS_prctl,
                    &[libc::PR_CAPBSET_DROP as u64, cap as u64, 0, 0, 0],
                    &format!("prctl(PR_CAPBSET_DROP, {cap})"),
                )?;
            }
        }
    }
    Ok(())
}

/// capset(2) (version 3: two 32-bit halves of each set) and the ambient set, in every
/// thread of a root process.
fn restore_root_caps(ctx: &Ctx, caps: &Caps, threads: &[&Stopped]) -> Result<(), RestoreError> {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = LINUX_CAPABILITY_VERSION_3.to_ne_bytes().to_vec();
    header.extend_from_slice(&0i32.to_ne_bytes());
    let mut data = Vec::with_capacity(24);
    for half in [0, 32] {
        for set in [caps.effective, caps.permitted, caps.inheritable] {
            data.extend_from_slice(&((set >> half) as u32).to_ne_bytes());
        }
    }
    for &t in threads {
        let h = ctx.put(0, &header)?;
        let d = ctx.put(64, &data)?;
        ctx.ok(t, libc::SYS_capset, &[h, d], "capset")?;
        for cap in 0..=cap_last_cap().min(63) {
            if caps.ambient & (1 << cap) != 0 {
                ctx.ok(
                    t,
                    libc::SYS_prctl,
                    &[
                        libc::PR_CAP_AMBIENT as u64,
                        libc::PR_CAP_AMBIENT_RAISE as u64,
                        cap as u64,
                        0,
                        0,
                    ],
                    &format!("prctl(PR_CAP_AMBIENT_RAISE, {cap})"),
                )?;
            }
        }
    }
    Ok(())
}

/// Sets a limit from inside the process (it may lower its own hard limit, which a
/// prlimit from outside without CAP_SYS_RESOURCE cannot when uids differ).
fn set_rlimit_inside(
    ctx: &Ctx,
    res: i32,
    cur: u64,
    max: u64,
    first: nix::errno::Errno,
) -> Result<(), nix::errno::Errno> {
    let mut b = cur.to_ne_bytes().to_vec();
    b.extend_from_slice(&max.to_ne_bytes());
    let a = ctx.put(0, &b).map_err(|_| first)?;
    match ctx
        .inj
        .call(&ctx.leader, libc::SYS_setrlimit, &[res as u64, a])
    {
        Ok(o) if o.ret == 0 => Ok(()),
        Ok(o) if o.ret < 0 => Err(nix::errno::Errno::from_raw(-o.ret as i32)),
        _ => Err(first),
    }
}

/// timer_create with the old ids (PR_TIMER_CREATE_RESTORE_IDS), then arm them.
fn restore_posix_timers(ctx: &Ctx, m: &Manifest) -> Result<(), RestoreError> {
    if m.posix_timers.is_empty() {
        return Ok(());
    }
    let t = &ctx.leader;
    ctx.ok(
        t,
        libc::SYS_prctl,
        &[
            kabi::PR_TIMER_CREATE_RESTORE_IDS,
            kabi::PR_TIMER_CREATE_RESTORE_IDS_ON,
            0,
            0,
            0,
        ],
        "prctl(PR_TIMER_CREATE_RESTORE_IDS)",
    )?;
    let mut timers = m.posix_timers.clone();
    timers.sort_by_key(|p| p.id);
    for pt in &timers {
        let mut sev = [0u8; 64];
        sev[..8].copy_from_slice(&pt.sival.to_ne_bytes());
        sev[8..12].copy_from_slice(&pt.signo.to_ne_bytes());
        sev[12..16].copy_from_slice(&pt.notify.to_ne_bytes());
        sev[16..20].copy_from_slice(&pt.tid.to_ne_bytes());
        let a = ctx.put(0, &sev)?;
        let idp = ctx.put(128, &pt.id.to_ne_bytes())?;
        ctx.ok(
            t,
            libc::SYS_timer_create,
            &[pt.clockid as u64, a, idp],
            &format!("timer_create(id {})", pt.id),
        )?;
        let mut b = [0u8; 4];
        sys::vm_read(ctx.pid, idp, &mut b).map_err(|e| RestoreError::Other {
            what: format!("reading timer id: {e}"),
        })?;
        if i32::from_ne_bytes(b) != pt.id {
            return Err(RestoreError::Other {
                what: format!(
                    "timer_create gave id {} instead of {}",
                    i32::from_ne_bytes(b),
                    pt.id
                ),
            });
        }
    }
    ctx.ok(
        t,
        libc::SYS_prctl,
        &[
            kabi::PR_TIMER_CREATE_RESTORE_IDS,
            kabi::PR_TIMER_CREATE_RESTORE_IDS_OFF,
            0,
            0,
            0,
        ],
        "prctl(PR_TIMER_CREATE_RESTORE_IDS off)",
    )?;
    for pt in &timers {
        let mut s = pt.setting;
        if s[2] == 0 && s[3] == 0 {
            // Expired with its signal pending: re-armed one interval on, as the kernel would.
            s[2] = s[0];
            s[3] = s[1];
        }
        if s[2] == 0 && s[3] == 0 {
            continue;
        }
        let b: Vec<u8> = s.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let a = ctx.put(0, &b)?;
        ctx.ok(
            t,
            libc::SYS_timer_settime,
            &[pt.id as u64, 0, a, 0],
            &format!("timer_settime(id {})", pt.id),
        )?;
    }
    Ok(())
}

/// no_new_privs, then dumpable and the parent-death signal (credential changes reset
/// them), the subreaper flag and THP disabling.
/// no_new_privs is a property of each thread, so every thread gets it.
fn restore_prctl(ctx: &Ctx, m: &Manifest, threads: &[&Stopped]) -> Result<(), RestoreError> {
    let p = &m.prctl;
    let set_in = |t: &Stopped, opt: i32, v: i64| {
        ctx.ok(
            t,
            libc::SYS_prctl,
            &[opt as u64, v as u64, 0, 0, 0],
            &format!("prctl({opt}, {v})"),
        )
        .map(drop)
    };
    let set = |opt: i32, v: i64| set_in(&ctx.leader, opt, v);
    if p.no_new_privs == 1 {
        for &t in threads {
            set_in(t, libc::PR_SET_NO_NEW_PRIVS, 1)?;
        }
    }
    if p.dumpable >= 0 {
        set(libc::PR_SET_DUMPABLE, p.dumpable)?;
    }
    set(libc::PR_SET_PDEATHSIG, p.pdeath_sig.max(0))?;
    if p.child_subreaper > 0 {
        set(libc::PR_SET_CHILD_SUBREAPER, 1)?;
    }
    if p.thp_disable > 0 {
        set(libc::PR_SET_THP_DISABLE, 1)?;
    }
    Ok(())
}
