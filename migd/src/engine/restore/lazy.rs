//! Lazy restore: the process runs at once and its private anonymous pages come in on
//! demand from pages.img, with read-ahead around each fault and a background prefetch
//! of the rest, until nothing depends on the image any more.
//!
//! How it is put together (see docs/lazy.md):
//! - [`plan`] splits the image: private anonymous areas with saved pages become lazy
//!   (registered with a userfaultfd in MISSING mode instead of filled); everything
//!   else, and the pages around each thread's stack pointer and rseq area, are filled
//!   eagerly by the ordinary restore path (it is given a manifest trimmed to those).
//! - [`create_uffd`] injects `userfaultfd(O_CLOEXEC|O_NONBLOCK)` into the target while
//!   it is still root and ptrace-stopped, takes it with pidfd_getfd and closes it there.
//! - [`arm`] registers the lazy areas once the process is shaped, fills any lazy page
//!   the restore itself touched (present now, so it would never fault), hands a
//!   second reference of the userfaultfd to the pid-namespace stub and returns the
//!   [`Pager`].
//! - The [`Pager`] is single-threaded and poll-driven ([`Pager::step`]): events first
//!   (fork, remap, remove, unmap), then faults (served with read-ahead), then, when
//!   idle, prefetch in large chunks. When every page is in, it unregisters the areas
//!   and closes the userfaultfd (ours and the stub's).
//!
//! Lazy pages never lie: a page is filled from the image or, if the image holds no
//! data for it (or the process dropped it with MADV_DONTNEED), with zeros; a page
//! whose data cannot be read waits until it can, or until `store_bound` has passed,
//! when the process is killed and the loss reported.

mod journal;
mod ranges;
mod source;

use super::spawn::StubLink;
use super::{Ctx, RestoreError};
use crate::engine::image::{self, Area, AreaKind, FdKind, Manifest};
use crate::sys::uffd::{self, Uffd, UffdEvent};
use crate::sys::{self, kabi};
use journal::{Change, Journal, Layout, Record};
use ranges::Ranges;
use source::Source;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// Filled eagerly on each side of a thread's stack pointer.
const STACK_WINDOW: u64 = 64 * 1024;

/// How a lazy restore serves pages.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// How long to keep retrying a failing pages.img read before giving up (the
    /// process is then killed and the loss reported).
    pub store_bound: Duration,
    /// Bytes filled per fault, around the faulting page and within its run.
    pub readahead: u64,
    /// Stream the pages nobody asked for in the background.
    pub prefetch: bool,
    /// Bytes per prefetch step.
    pub prefetch_chunk: u64,
    /// Wait this long after the process runs before prefetching (tests use it to
    /// have events hit missing pages).
    pub prefetch_delay: Duration,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            store_bound: Duration::from_secs(60),
            readahead: 1 << 20,
            prefetch: true,
            prefetch_chunk: 4 << 20,
            prefetch_delay: Duration::ZERO,
        }
    }
}

/// What a lazy restore did so far.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Progress {
    /// Faults served (page faults read from a userfaultfd).
    pub faults: u64,
    /// Bytes filled from the image because of faults (with their read-ahead).
    pub faulted_bytes: u64,
    /// Bytes filled from the image by the prefetch.
    pub prefetched_bytes: u64,
    /// Pages answered with zeros (no data in the image, or dropped by the process).
    pub zero_pages: u64,
    /// Image bytes not filled yet, over every address space served.
    pub remaining_bytes: u64,
    /// Every page is in; nothing depends on pages.img any more.
    pub done: bool,
    /// The store error being waited out, if reads are failing now.
    pub stalled: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(
        "lazy restore: reading {path} failed for {secs:.1} s ({cause}); the process was killed, \
         {lost} bytes of its memory were never restored. Check the store and restore again \
         from the image"
    )]
    StoreLost {
        path: String,
        cause: String,
        secs: f64,
        lost: u64,
    },
    #[error("lazy restore: {what}: {errno}")]
    Uffd {
        what: String,
        errno: nix::errno::Errno,
    },
    #[error("resuming a lazy restore: {what}")]
    Resume { what: String },
    #[error(transparent)]
    Image(#[from] image::ImageError),
}

/// Whether an area is served lazily: private anonymous memory with saved pages (the
/// only kind MISSING mode takes; wipe-on-fork areas stay eager, since a forked child
/// must see zeros there, not the image).
fn is_lazy(a: &Area) -> bool {
    a.kind == AreaKind::Anon && !a.shared && !a.runs.is_empty() && !a.madv.iter().any(|f| f == "wf")
}

/// The address ranges filled eagerly inside lazy areas: around each thread's stack
/// pointer (the kernel writes signal frames there before anyone could serve a
/// fault) and each thread's rseq area (the kernel writes it at registration).
fn eager_windows(m: &Manifest) -> Ranges {
    let mut w = Ranges::default();
    for t in &m.threads {
        if let Some(&sp) = t.regs.get(19) {
            let lo = sp.saturating_sub(STACK_WINDOW) & !(PAGE - 1);
            let hi = (sp + STACK_WINDOW + PAGE - 1) & !(PAGE - 1);
            add_window(&mut w, lo, hi);
        }
        if let Some(rs) = t.rseq {
            let lo = rs.ptr & !(PAGE - 1);
            let hi = (rs.ptr + rs.len as u64 + PAGE - 1) & !(PAGE - 1);
            add_window(&mut w, lo, hi);
        }
    }
    w
}

fn add_window(w: &mut Ranges, lo: u64, hi: u64) {
    let mut lo = lo;
    let mut hi = hi;
    for (s, e, _) in w.cut(lo, hi) {
        lo = lo.min(s);
        hi = hi.max(e);
    }
    // merge with touching neighbours
    if let Some((s, e, _)) = w.find(lo.saturating_sub(1)) {
        w.cut(s, e);
        lo = s;
    }
    if let Some((s, e, _)) = w.find(hi) {
        w.cut(s, e);
        hi = e;
    }
    w.insert(lo, hi, 0);
}

/// The image split for a lazy restore.
pub struct Plan {
    /// The manifest the ordinary restore path shapes with: lazy areas keep only the
    /// runs inside the eager windows.
    pub shaping: Manifest,
    /// Lazy areas: (start, end).
    pub areas: Vec<(u64, u64)>,
    /// Image pages of lazy areas not filled eagerly: address -> pages.img offset.
    missing: Ranges,
    /// Ranges filled eagerly inside lazy areas.
    eager: Ranges,
}

impl Plan {
    /// Bytes that will come in lazily.
    pub fn lazy_bytes(&self) -> u64 {
        self.missing.bytes()
    }
}

/// Splits the image into what is filled before the process runs and what is served
/// on demand.
pub fn plan(m: &Manifest) -> Plan {
    let windows = eager_windows(m);
    let mut shaping = m.clone();
    let mut missing = Ranges::default();
    let mut eager = Ranges::default();
    let mut areas = Vec::new();
    for a in shaping.areas.iter_mut() {
        if !is_lazy(a) {
            continue;
        }
        areas.push((a.start, a.end));
        let mut keep = Vec::new();
        for &(addr, n, off) in &a.runs {
            let mut run = Ranges::default();
            run.insert(addr, addr + n * PAGE, off);
            for (ws, we, _) in windows.0.iter().map(|(&s, &(e, o))| (s, e, o)) {
                for (s, e, o) in run.cut(ws, we) {
                    keep.push((s, (e - s) / PAGE, o));
                    eager.insert(s, e, 0);
                }
            }
            for (&s, &(e, o)) in &run.0 {
                missing.insert(s, e, o);
            }
        }
        keep.sort();
        a.runs = keep;
    }
    Plan {
        shaping,
        areas,
        missing,
        eager,
    }
}

/// Checks the CRC-32C of every pages.img chunk the eager part of the restore reads
/// (the lazy part checks each chunk when it reads it).
pub fn check_eager_chunks(
    images: &Path,
    m: &Manifest,
    plan: &Plan,
    pages: &[u8],
) -> Result<(), RestoreError> {
    let mut chunks = std::collections::BTreeSet::new();
    let mut add = |off: u64, len: u64| {
        if len > 0 {
            for c in off / image::CHUNK..=(off + len - 1) / image::CHUNK {
                chunks.insert(c);
            }
        }
    };
    for a in &plan.shaping.areas {
        for &(_, n, off) in &a.runs {
            add(off, n * PAGE);
        }
    }
    for f in &m.fds {
        match &f.kind {
            FdKind::Deleted { data_off, len, .. } | FdKind::Memfd { data_off, len, .. } => {
                add(*data_off, *len)
            }
            _ => {}
        }
    }
    let path = images.join(image::PAGES_FILE);
    for c in chunks {
        let lo = (c * image::CHUNK) as usize;
        let hi = (lo + image::CHUNK as usize).min(pages.len());
        let ok = pages
            .get(lo..hi)
            .zip(m.chunk_crcs.get(c as usize))
            .is_some_and(|(b, &crc)| crc32c::crc32c(b) == crc);
        if !ok {
            return Err(image::ImageError::Checksum {
                path,
                what: format!("page chunk {c} (bytes {lo}..)"),
            }
            .into());
        }
    }
    Ok(())
}

/// Creates the userfaultfd inside the target (it binds to the caller's mm) while the
/// target is still root and stopped; returns our reference, API done.
pub fn create_uffd(ctx: &Ctx) -> Result<Uffd, RestoreError> {
    let t = &ctx.leader;
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    let fd = ctx.ok(t, kabi::SYS_USERFAULTFD, &[flags], "userfaultfd")?;
    let other = |what: String| RestoreError::Other { what };
    let pidfd = sys::pidfd_open(ctx.pid).map_err(|e| other(format!("pidfd_open: {e}")))?;
    let ours = sys::pidfd_getfd(pidfd.as_raw_fd(), fd as i32)
        .map_err(|e| other(format!("pidfd_getfd(userfaultfd): {e}")))?;
    ctx.ok(t, libc::SYS_close, &[fd as u64], "close(userfaultfd)")?;
    let u = Uffd::from_fd(ours);
    let want = kabi::UFFD_FEATURE_EVENT_FORK
        | kabi::UFFD_FEATURE_EVENT_REMAP
        | kabi::UFFD_FEATURE_EVENT_REMOVE
        | kabi::UFFD_FEATURE_EVENT_UNMAP;
    let got = u.api(want).map_err(|e| other(format!("UFFDIO_API: {e}")))?;
    if got & want != want {
        return Err(RestoreError::Refused {
            what: format!(
                "this kernel's userfaultfd lacks event features {:#x} a lazy restore needs",
                want & !got
            ),
        });
    }
    Ok(u)
}

/// Registers the lazy areas, fills the lazy pages the restore touched, and hands a
/// second reference to the stub. The process is shaped and still stopped.
pub fn arm(
    ctx: &Ctx,
    uffd: Uffd,
    plan: Plan,
    images: &Path,
    m: &Manifest,
    mut link: StubLink,
    opts: &LazyOptions,
) -> Result<Pager, RestoreError> {
    let other = |what: String| RestoreError::Other { what };
    let mut registered = Ranges::default();
    for &(s, e) in &plan.areas {
        uffd.register(s, e - s, kabi::UFFDIO_REGISTER_MODE_MISSING)
            .map_err(|e2| other(format!("UFFDIO_REGISTER {s:#x}-{e:#x}: {e2}")))?;
        registered.insert(s, e, 0);
    }
    let mut missing = plan.missing;
    // Pages present now were touched during the restore (or are eager): they will
    // never fault, so any not filled eagerly gets its image data now.
    let pm_path = format!("/proc/{}/pagemap", ctx.pid);
    let pm = std::fs::File::open(&pm_path).map_err(|source| RestoreError::Io {
        path: pm_path.clone(),
        source,
    })?;
    let src =
        std::fs::File::open(images.join(image::PAGES_FILE)).map_err(|source| RestoreError::Io {
            path: images.join(image::PAGES_FILE).display().to_string(),
            source,
        })?;
    let mut touched = 0u64;
    for &(s, e) in &plan.areas {
        let ranges = present(pm.as_raw_fd(), s, e)
            .map_err(|e2| other(format!("PAGEMAP_SCAN {pm_path}: {e2}")))?;
        for (rs, re) in ranges {
            for (a, b, off) in missing.cut(rs, re) {
                let mut buf = vec![0u8; (b - a) as usize];
                src.read_exact_at(&mut buf, off)
                    .map_err(|source| RestoreError::Io {
                        path: images.join(image::PAGES_FILE).display().to_string(),
                        source,
                    })?;
                sys::vm_write(ctx.pid, a, &buf)
                    .map_err(|e2| other(format!("filling touched pages at {a:#x}: {e2}")))?;
                touched += b - a;
            }
        }
    }
    if touched > 0 {
        tracing::debug!(
            bytes = touched,
            "lazy pages touched by the restore, filled now"
        );
    }
    drop(plan.eager);
    let stub_fd = link
        .hold(uffd.fd())
        .map_err(|e| other(format!("handing the userfaultfd to the stub: {e}")))?;
    let mut journal =
        Journal::create().map_err(|e| other(format!("memfd_create(lazy journal): {e}")))?;
    link.hold(journal.fd())
        .map_err(|e| other(format!("handing the lazy journal to the stub: {e}")))?;
    journal.append(&Record::Root { fd: stub_fd });
    let pages = images.join(image::PAGES_FILE);
    let mut pager = Pager::new(pages, m, opts.clone(), Some(link.pid));
    pager.link = Some(link);
    pager.journal = Some(journal);
    pager.spaces.push(Space::new(
        0,
        uffd,
        Some(stub_fd),
        Layout {
            missing,
            registered,
        },
    ));
    pager.first_stub_fd = Some(stub_fd);
    Ok(pager)
}

/// The present (or swapped) parts of `[start, end)` in `pm` (an open
/// /proc/PID/pagemap).
fn present(pm: RawFd, start: u64, end: u64) -> Result<Vec<(u64, u64)>, nix::errno::Errno> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let mut regions = Vec::new();
        let next = uffd::pagemap_scan(
            pm,
            at,
            end,
            0,
            0,
            0,
            kabi::PAGE_IS_PRESENT | kabi::PAGE_IS_SWAPPED,
            0,
            &mut regions,
        )?;
        out.extend(regions.iter().map(|r| (r.start, r.end)));
        if next <= at {
            break;
        }
        at = next;
    }
    Ok(out)
}

/// One address space served: the restored process, or a child it forked.
struct Space {
    /// Its number in the journal (0: the restored process).
    id: u64,
    uffd: Uffd,
    /// The stub's copy of this userfaultfd.
    stub_fd: Option<i32>,
    /// Image pages not filled yet; ranges registered (unregistered at the end).
    layout: Layout,
    /// Faults read but not served yet (the store is failing).
    pending: Vec<u64>,
    /// Where the prefetch goes on.
    cursor: u64,
    dead: bool,
}

impl Space {
    fn new(id: u64, uffd: Uffd, stub_fd: Option<i32>, layout: Layout) -> Space {
        Space {
            id,
            uffd,
            stub_fd,
            layout,
            pending: Vec::new(),
            cursor: 0,
            dead: false,
        }
    }
}

/// Serves the missing pages of a lazily restored process (and of the children it
/// forks) from pages.img. Single-threaded: drive it with [`step`](Pager::step), or
/// poll [`fds`](Pager::fds) with your own fds and call `step(Duration::ZERO)` when one
/// is ready or [`next_timeout`](Pager::next_timeout) has passed.
pub struct Pager {
    spaces: Vec<Space>,
    source: Source,
    opts: LazyOptions,
    /// Killed (SIGKILL) if the store stays unreadable past `store_bound`: the stub,
    /// i.e. the whole pid namespace.
    victim: Option<i32>,
    link: Option<StubLink>,
    first_stub_fd: Option<i32>,
    journal: Option<Journal>,
    next_id: u64,
    progress: Progress,
    started: Instant,
    /// Since when reads fail, and why.
    stall: Option<(Instant, String)>,
    retry_at: Option<Instant>,
    backoff: Duration,
    finished_at: Option<Duration>,
}

enum Served {
    Done,
    /// The store failed: keep the fault and retry later.
    Store(String),
    /// The layout is changing: read events first.
    Again,
}

impl Pager {
    fn new(pages: PathBuf, m: &Manifest, opts: LazyOptions, victim: Option<i32>) -> Pager {
        Pager {
            spaces: Vec::new(),
            source: Source {
                path: pages,
                file: None,
                len: m.pages_len,
                crcs: m.chunk_crcs.clone(),
                cache: Vec::new(),
                stage: Vec::new(),
            },
            opts,
            victim,
            link: None,
            first_stub_fd: None,
            journal: None,
            next_id: 1,
            progress: Progress::default(),
            started: Instant::now(),
            stall: None,
            retry_at: None,
            backoff: Duration::from_millis(50),
            finished_at: None,
        }
    }

    /// Takes over serving a lazily restored process whose server went away: the
    /// userfaultfd is taken from the stub (`stub_pid`, its fd number `stub_fd`, as in
    /// [`super::RestoreReport::uffd_stub_fd`]), with the journal the stub also holds
    /// (the layout changes the old server was told of, and the children it served,
    /// whose userfaultfds are taken too). Pages already in are skipped (or answer
    /// EEXIST), and threads left waiting on a fault the old server had read are
    /// woken so that they fault again.
    ///
    /// Not known to a resumed server: an event the old one read but had not written
    /// to the journal when it died. Children forked after a resume are served, but
    /// the stub holds no second reference to their userfaultfds.
    pub fn resume(
        stub_pid: i32,
        stub_fd: i32,
        images: &Path,
        opts: &LazyOptions,
    ) -> Result<Pager, LazyError> {
        let m = image::read_manifest(images)?;
        let plan = plan(&m);
        let err = |what: &str, errno| LazyError::Uffd {
            what: what.to_string(),
            errno,
        };
        let journal = Journal::take_from(stub_pid).map_err(|what| LazyError::Resume { what })?;
        let mut registered = Ranges::default();
        for &(s, e) in &plan.areas {
            registered.insert(s, e, 0);
        }
        let mut spaces: BTreeMap<u64, (Layout, i32)> = BTreeMap::new();
        spaces.insert(
            0,
            (
                Layout {
                    missing: plan.missing.clone(),
                    registered,
                },
                stub_fd,
            ),
        );
        let mut next_id = 1;
        match &journal {
            Some(j) => {
                for r in j.records() {
                    match r {
                        Record::Root { fd } if fd != stub_fd => {
                            return Err(LazyError::Resume {
                                what: format!(
                                    "the stub's journal says the process's userfaultfd is fd {fd}, not {stub_fd}"
                                ),
                            })
                        }
                        Record::Root { .. } => {}
                        Record::Change { space, change } => {
                            if let Some((l, _)) = spaces.get_mut(&space) {
                                l.apply(&change);
                            }
                        }
                        Record::Fork { parent, child, fd } => {
                            if let Some((l, _)) = spaces.get(&parent).cloned() {
                                spaces.insert(child, (l, fd));
                            }
                            next_id = next_id.max(child + 1);
                        }
                        Record::Done { space } => {
                            spaces.remove(&space);
                        }
                    }
                }
            }
            None => tracing::warn!(
                stub_pid,
                "the stub holds no lazy journal: layout changes the old server handled are unknown"
            ),
        }
        // Pages of the restored process already in need nothing.
        if let (Some((l, _)), Some(&target)) = (
            spaces.get_mut(&0),
            crate::engine::procfs::children_of(stub_pid).first(),
        ) {
            if let Ok(pm) = std::fs::File::open(format!("/proc/{target}/pagemap")) {
                let regs: Vec<(u64, u64)> =
                    l.registered.0.iter().map(|(&s, &(e, _))| (s, e)).collect();
                for (s, e) in regs {
                    for (a, b) in present(pm.as_raw_fd(), s, e).unwrap_or_default() {
                        l.missing.cut(a, b);
                    }
                }
            }
        }
        let pidfd = sys::pidfd_open(stub_pid).map_err(|e| err("pidfd_open(stub)", e))?;
        let mut pager = Pager::new(
            images.join(image::PAGES_FILE),
            &m,
            opts.clone(),
            Some(stub_pid),
        );
        for (id, (layout, fd)) in spaces {
            let uffd = Uffd::from_fd(
                sys::pidfd_getfd(pidfd.as_raw_fd(), fd)
                    .map_err(|e| err(&format!("pidfd_getfd(stub {stub_pid}, fd {fd})"), e))?,
            );
            for (&s, &(e, _)) in &layout.registered.0 {
                let _ = uffd.wake(s, e - s);
            }
            pager.spaces.push(Space::new(id, uffd, Some(fd), layout));
        }
        pager.journal = journal;
        pager.next_id = next_id;
        pager.first_stub_fd = Some(stub_fd);
        pager.refresh();
        Ok(pager)
    }

    /// The stub's copy of the process's userfaultfd (for [`Pager::resume`]).
    pub fn stub_fd(&self) -> Option<i32> {
        self.first_stub_fd
    }

    /// The link to the stub (the restored process's end status comes there).
    pub fn link_mut(&mut self) -> Option<&mut StubLink> {
        self.link.as_mut()
    }

    /// Gives the link to the stub back (e.g. once the pager is done).
    pub fn take_link(&mut self) -> Option<StubLink> {
        self.link.take()
    }

    /// The userfaultfds to poll for input (one per address space served).
    pub fn fds(&self) -> Vec<RawFd> {
        self.spaces.iter().map(|s| s.uffd.fd()).collect()
    }

    /// How long the caller may sleep without a ready fd before calling
    /// [`step`](Self::step): zero while prefetch work is waiting, `None` if only
    /// events can make work.
    pub fn next_timeout(&self) -> Option<Duration> {
        if self.spaces.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut t: Option<Duration> = None;
        let mut take = |d: Duration| t = Some(t.map_or(d, |x: Duration| x.min(d)));
        if let Some(r) = self.retry_at {
            take(r.saturating_duration_since(now));
        } else if self.opts.prefetch && self.spaces.iter().any(|s| !s.layout.missing.is_empty()) {
            let due = self.started + self.opts.prefetch_delay;
            take(due.saturating_duration_since(now));
        }
        t
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Time from the pager's start until every page was in.
    pub fn finished_after(&self) -> Option<Duration> {
        self.finished_at
    }

    pub fn done(&self) -> bool {
        self.spaces.is_empty()
    }

    /// Waits up to `timeout` for events, handles them all, serves the faults, and
    /// prefetches one chunk if nothing else waits. Returns the progress so far; an
    /// error only when the store stayed unreadable past `store_bound` (the process
    /// has then been killed).
    pub fn step(&mut self, timeout: Duration) -> Result<Progress, LazyError> {
        if self.spaces.is_empty() {
            return Ok(self.progress.clone());
        }
        let wait = self
            .next_timeout()
            .map_or(timeout, |t| t.min(timeout))
            .as_millis()
            .min(i32::MAX as u128) as i32;
        let fds = self.fds();
        let _ = uffd::poll_readable(&fds, wait);
        self.read_events();
        self.serve_faults();
        let faults_waiting = self.spaces.iter().any(|s| !s.pending.is_empty());
        let retry_due = self.retry_at.is_none_or(|r| Instant::now() >= r);
        if !faults_waiting
            && retry_due
            && self.opts.prefetch
            && self.started.elapsed() >= self.opts.prefetch_delay
        {
            self.prefetch_one();
        }
        self.finish_spaces();
        self.refresh();
        if let Some((since, cause)) = &self.stall {
            if since.elapsed() > self.opts.store_bound {
                let lost = self.progress.remaining_bytes;
                let e = LazyError::StoreLost {
                    path: self.source.path.display().to_string(),
                    cause: cause.clone(),
                    secs: since.elapsed().as_secs_f64(),
                    lost,
                };
                tracing::error!(error = %e, "giving up on the store");
                if let Some(v) = self.victim {
                    let _ = sys::kill(v, libc::SIGKILL);
                }
                self.spaces.clear();
                return Err(e);
            }
        }
        Ok(self.progress.clone())
    }

    fn refresh(&mut self) {
        self.progress.remaining_bytes = self.spaces.iter().map(|s| s.layout.missing.bytes()).sum();
        self.progress.done = self.spaces.is_empty();
        self.progress.stalled = self.stall.as_ref().map(|(_, c)| c.clone());
        if self.progress.done && self.finished_at.is_none() {
            self.finished_at = Some(self.started.elapsed());
        }
    }

    fn read_events(&mut self) {
        let mut born = Vec::new();
        for sp in self.spaces.iter_mut() {
            loop {
                let ev = match sp.uffd.read_event_owned() {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading a userfaultfd");
                        break;
                    }
                };
                let change = match ev {
                    (UffdEvent::PageFault { addr, .. }, _) => {
                        self.progress.faults += 1;
                        sp.pending.push(addr & !(PAGE - 1));
                        continue;
                    }
                    (UffdEvent::Fork { .. }, Some(child)) => {
                        // The child lacks the pages the parent lacks; its userfaultfd
                        // goes to the stub (a second reference) and into the journal
                        // now, before any later change of the parent.
                        let id = self.next_id;
                        self.next_id += 1;
                        let stub_fd = self.link.as_mut().and_then(|l| {
                            l.hold(child.fd())
                                .map_err(|e| tracing::warn!(error = %e, "could not hand a child's userfaultfd to the stub"))
                                .ok()
                        });
                        if let (Some(j), Some(fd)) = (self.journal.as_mut(), stub_fd) {
                            j.append(&Record::Fork {
                                parent: sp.id,
                                child: id,
                                fd,
                            });
                        }
                        born.push(Space::new(id, child, stub_fd, sp.layout.clone()));
                        continue;
                    }
                    (UffdEvent::Remove { start, end }, _) => Change::Remove { start, end },
                    (UffdEvent::Unmap { start, end }, _) => Change::Unmap { start, end },
                    (UffdEvent::Remap { from, to, len }, _) => Change::Remap { from, to, len },
                    (ev, _) => {
                        tracing::debug!(?ev, "userfaultfd event ignored");
                        continue;
                    }
                };
                if let Some(j) = self.journal.as_mut() {
                    j.append(&Record::Change {
                        space: sp.id,
                        change,
                    });
                }
                sp.layout.apply(&change);
            }
        }
        self.spaces.extend(born);
    }

    fn serve_faults(&mut self) {
        for i in 0..self.spaces.len() {
            let pending = std::mem::take(&mut self.spaces[i].pending);
            let mut left = Vec::new();
            for (k, &addr) in pending.iter().enumerate() {
                match self.serve_fault(i, addr) {
                    Served::Done => {}
                    Served::Again => left.push(addr),
                    Served::Store(cause) => {
                        self.stalled(cause);
                        left.extend_from_slice(&pending[k..]);
                        break;
                    }
                }
            }
            self.spaces[i].pending = left;
        }
    }

    fn stalled(&mut self, cause: String) {
        if self.stall.is_none() {
            tracing::warn!(path = %self.source.path.display(), cause, "pages.img unreadable; faulting threads wait");
            self.stall = Some((Instant::now(), cause));
        } else if let Some(s) = self.stall.as_mut() {
            s.1 = cause;
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
    }

    fn store_ok(&mut self) {
        if let Some((since, _)) = self.stall.take() {
            tracing::info!(
                secs = since.elapsed().as_secs_f64(),
                "pages.img readable again"
            );
        }
        self.retry_at = None;
        self.backoff = Duration::from_millis(50);
    }

    fn serve_fault(&mut self, i: usize, addr: u64) -> Served {
        let sp = &self.spaces[i];
        if sp.dead {
            return Served::Done;
        }
        let Some((s, e, o)) = sp.layout.missing.find(addr) else {
            // No image data here (or dropped by the process, or already filled).
            return match sp.uffd.zeropage(addr, PAGE) {
                Ok(_) => {
                    self.progress.zero_pages += 1;
                    Served::Done
                }
                Err((_, nix::errno::Errno::EAGAIN)) => Served::Again,
                Err(_) => {
                    let _ = sp.uffd.wake(addr, PAGE);
                    Served::Done
                }
            };
        };
        if self.retry_at.is_some_and(|r| Instant::now() < r) {
            return Served::Store(self.stall.as_ref().map(|s| s.1.clone()).unwrap_or_default());
        }
        let ra = self.opts.readahead.max(PAGE);
        let lo = s.max(addr.saturating_sub(ra / 8) & !(PAGE - 1));
        let hi = e.min(addr + ra);
        tracing::trace!(addr, lo, hi, s, e, "fault");
        match self.fill(i, lo, hi, o + (lo - s)) {
            Ok(n) => {
                self.progress.faulted_bytes += n;
                self.spaces[i].cursor = hi;
                self.store_ok();
                Served::Done
            }
            Err(r) => r,
        }
    }

    /// Copies image bytes at `off` to `[lo, hi)` of space `i` (all inside one
    /// missing range); returns the bytes filled. The copy goes in pieces that each lie
    /// inside one chunk of pages.img (no staging copy), but for a page straddling
    /// two chunks.
    fn fill(&mut self, i: usize, lo: u64, hi: u64, off: u64) -> Result<u64, Served> {
        let mut filled = 0u64;
        let mut a = lo;
        while a < hi {
            let off_a = off + (a - lo);
            let chunk_end = (off_a / image::CHUNK + 1) * image::CHUNK;
            let whole = (chunk_end - off_a) / PAGE * PAGE;
            let b = if whole > 0 { a + whole } else { a + PAGE }.min(hi);
            match self.fill_piece(i, a, b, off_a) {
                Ok(n) => filled += n,
                Err(e) if filled == 0 => return Err(e),
                Err(_) => return Ok(filled),
            }
            if self.spaces[i].dead {
                break;
            }
            a = b;
        }
        Ok(filled)
    }

    fn fill_piece(&mut self, i: usize, lo: u64, hi: u64, off: u64) -> Result<u64, Served> {
        let data = match self.source.read(off, hi - lo) {
            Ok(d) => d,
            Err(e) => return Err(Served::Store(e)),
        };
        let sp = &mut self.spaces[i];
        let mut at = 0u64;
        let mut filled = 0u64;
        let len = hi - lo;
        while at < len {
            // Always wake: a thread may wait on a page of a prefetched range (its fault
            // not read yet); DONTWAKE would leave it asleep until we read its fault.
            match sp.uffd.copy(lo + at, &data[at as usize..], false) {
                Ok(n) => {
                    filled += n;
                    at += n;
                }
                Err((n, e)) => {
                    filled += n;
                    at += n;
                    match e {
                        nix::errno::Errno::EEXIST => at += PAGE,
                        nix::errno::Errno::EAGAIN => {
                            // The layout is changing: events first; keep the rest.
                            sp.layout.missing.cut(lo, lo + at);
                            return if at > 0 {
                                Ok(filled)
                            } else {
                                Err(Served::Again)
                            };
                        }
                        nix::errno::Errno::ESRCH => {
                            sp.dead = true;
                            break;
                        }
                        _ => {
                            // ENOENT: not registered there any more (unmapped).
                            tracing::debug!(addr = lo + at, errno = %e, "UFFDIO_COPY");
                            break;
                        }
                    }
                }
            }
        }
        sp.layout.missing.cut(lo, hi);
        Ok(filled)
    }

    fn prefetch_one(&mut self) {
        let chunk = self.opts.prefetch_chunk.max(PAGE);
        for i in 0..self.spaces.len() {
            let sp = &self.spaces[i];
            if sp.dead {
                continue;
            }
            let Some((s, e, o)) = sp.layout.missing.next_from(sp.cursor) else {
                continue;
            };
            let lo = if s <= sp.cursor && sp.cursor < e {
                sp.cursor & !(PAGE - 1)
            } else {
                s
            };
            let hi = e.min(lo + chunk);
            match self.fill(i, lo, hi, o + (lo - s)) {
                Ok(n) => {
                    self.progress.prefetched_bytes += n;
                    self.spaces[i].cursor = hi;
                    self.store_ok();
                }
                Err(Served::Store(cause)) => self.stalled(cause),
                Err(_) => {}
            }
            return;
        }
    }

    /// Spaces with nothing missing (or whose process is gone): unregister, close,
    /// and let the stub drop its copy.
    fn finish_spaces(&mut self) {
        let mut k = 0;
        while k < self.spaces.len() {
            let sp = &self.spaces[k];
            let finished = sp.dead || (sp.layout.missing.is_empty() && sp.pending.is_empty());
            if !finished {
                k += 1;
                continue;
            }
            let sp = self.spaces.remove(k);
            if !sp.dead {
                for (&s, &(e, _)) in &sp.layout.registered.0 {
                    if let Err(err) = sp.uffd.unregister(s, e - s) {
                        tracing::debug!(start = s, end = e, error = %err, "UFFDIO_UNREGISTER");
                    }
                }
            }
            if let Some(j) = self.journal.as_mut() {
                j.append(&Record::Done { space: sp.id });
            }
            if let (Some(n), Some(link)) = (sp.stub_fd, self.link.as_ref()) {
                link.drop_fd(n);
            }
        }
    }
}
