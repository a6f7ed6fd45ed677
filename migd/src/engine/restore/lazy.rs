//! Lazy restore: the process runs at once and its private anonymous pages come in on
//! demand from pages.img, with read-ahead around each fault and a background prefetch
//! of the rest, until nothing depends on the image any more.
//!
//! How it is put together (docs/lazy.md tells more):
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
//! - The stub also holds the pager's journal (`lazy/journal.rs`: layout changes,
//!   forks), so that [`Pager::resume`] can take over from a server that died.
//!
//! Lazy pages never lie: a page is filled from the image or, if the image holds no
//! data for it (or the process dropped it with MADV_DONTNEED), with zeros; a page
//! whose data cannot be read waits until it can, or until `store_bound` has passed,
//! when the process is killed and the loss reported.

mod journal;
mod ranges;
mod retry;
mod setup;
mod source;

use super::spawn::StubLink;
use crate::engine::image::{self, Manifest};
use crate::sys;
use crate::sys::uffd::{self, Uffd, UffdEvent};
use journal::{Change, Journal, Layout, Record};
use ranges::Ranges;
pub use retry::poll_ms;
use retry::Retry;
use setup::present;
pub use setup::{arm, create_uffd, plan, read_eager_chunks, Plan};
use source::Source;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

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
    /// Cap on background prefetch, bytes per second (0: none). Faults are served at
    /// once whatever the cap.
    pub prefetch_rate: u64,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            store_bound: Duration::from_secs(60),
            readahead: 1 << 20,
            prefetch: true,
            prefetch_chunk: 4 << 20,
            prefetch_delay: Duration::ZERO,
            prefetch_rate: 0,
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
    /// Of the bytes faulted in and prefetched, those taken from pages read before
    /// the restore (see `restore::warm`) rather than from the store.
    pub warm_bytes: u64,
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

/// One address space served: the restored process, or a child it forked.
struct Space {
    /// Its number in the journal (0: the restored process).
    id: u64,
    uffd: Uffd,
    /// The stub's copy of this userfaultfd.
    stub_fd: Option<i32>,
    /// The process, when known (the restored one, as we see it).
    pid: Option<i32>,
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
            pid: None,
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
    /// No prefetch before this: the late pages it would read are not written yet.
    prefetch_hold: Option<Instant>,
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
    /// When failed reads are tried again (and since when they fail).
    retry: Retry,
    finished_at: Option<Duration>,
    /// Time spent reading the image and copying into the process (debug figures).
    read_time: Duration,
    copy_time: Duration,
}

/// Missing ranges one prefetch step or one fault's read-ahead goes through at most.
const MAX_RANGES_PER_STEP: usize = 256;

enum Served {
    Done,
    /// The store failed: keep the fault and retry later.
    Store(String),
    /// The source has not written the page's late chunk yet (asked for it): keep
    /// the fault and retry soon.
    NotYet(String),
    /// The layout is changing: read events first.
    Again,
    /// Reads failed and their retry is not due yet: keep the fault, change nothing.
    Later,
}

impl Pager {
    fn new(
        images: &Path,
        m: &Manifest,
        opts: LazyOptions,
        victim: Option<i32>,
        warm: Option<super::warm::WarmPages>,
    ) -> Pager {
        Pager {
            spaces: Vec::new(),
            source: Source::new(m, images, warm),
            prefetch_hold: None,
            opts,
            victim,
            link: None,
            first_stub_fd: None,
            journal: None,
            next_id: 1,
            progress: Progress::default(),
            started: Instant::now(),
            retry: Retry::new(),
            finished_at: None,
            read_time: Duration::ZERO,
            copy_time: Duration::ZERO,
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
        let target = crate::engine::procfs::children_of(stub_pid)
            .first()
            .copied();
        if let (Some((l, _)), Some(target)) = (spaces.get_mut(&0), target) {
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
        let mut pager = Pager::new(images, &m, opts.clone(), Some(stub_pid), None);
        for (id, (layout, fd)) in spaces {
            let uffd = Uffd::from_fd(
                sys::pidfd_getfd(pidfd.as_raw_fd(), fd)
                    .map_err(|e| err(&format!("pidfd_getfd(stub {stub_pid}, fd {fd})"), e))?,
            );
            for (&s, &(e, _)) in &layout.registered.0 {
                let _ = uffd.wake(s, e - s);
            }
            let mut sp = Space::new(id, uffd, Some(fd), layout);
            if id == 0 {
                sp.pid = target;
            }
            pager.spaces.push(sp);
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
        if let Some(r) = self.retry.at() {
            take(r.saturating_duration_since(now));
        } else if self.opts.prefetch && self.spaces.iter().any(|s| !s.layout.missing.is_empty()) {
            take(self.prefetch_due().saturating_duration_since(now));
        }
        t
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// When the next prefetch chunk may go: after the delay, and no faster than
    /// the rate cap allows for what was prefetched so far.
    fn prefetch_due(&self) -> Instant {
        let mut due = self.started + self.opts.prefetch_delay;
        if self.opts.prefetch_rate > 0 {
            due += Duration::from_secs_f64(
                self.progress.prefetched_bytes as f64 / self.opts.prefetch_rate as f64,
            );
        }
        match self.prefetch_hold {
            Some(h) => due.max(h),
            None => due,
        }
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
        let wait = poll_ms(self.next_timeout().map_or(timeout, |t| t.min(timeout)));
        let fds = self.fds();
        let _ = uffd::poll_readable(&fds, wait);
        self.read_events();
        self.serve_faults();
        let faults_waiting = self.spaces.iter().any(|s| !s.pending.is_empty());
        let retry_due = self.retry.due(Instant::now());
        if !faults_waiting
            && retry_due
            && self.opts.prefetch
            && Instant::now() >= self.prefetch_due()
        {
            self.prefetch_one();
        }
        self.progress.warm_bytes = self.source.warm_served;
        self.finish_spaces();
        self.refresh();
        if let Some((for_, cause)) = self.retry.stalled(Instant::now()) {
            if for_ > self.opts.store_bound {
                let lost = self.progress.remaining_bytes;
                let e = LazyError::StoreLost {
                    path: self.source.main.path.display().to_string(),
                    cause: cause.to_string(),
                    secs: for_.as_secs_f64(),
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
        if self.progress.done && self.finished_at.is_none() {
            self.source.all_in();
        }
        self.progress.stalled = self
            .retry
            .stalled(Instant::now())
            .map(|(_, c)| c.to_string());
        if self.progress.done && self.finished_at.is_none() {
            let all = self.started.elapsed();
            self.finished_at = Some(all);
            let p = &self.progress;
            tracing::debug!(
                all_ms = all.as_secs_f64() * 1e3,
                read_ms = self.read_time.as_secs_f64() * 1e3,
                copy_ms = self.copy_time.as_secs_f64() * 1e3,
                faults = p.faults,
                faulted_bytes = p.faulted_bytes,
                prefetched_bytes = p.prefetched_bytes,
                warm_bytes = p.warm_bytes,
                "every page is in"
            );
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
                    Served::Later => {
                        left.extend_from_slice(&pending[k..]);
                        break;
                    }
                    Served::Store(cause) => {
                        self.stalled(cause);
                        left.extend_from_slice(&pending[k..]);
                        break;
                    }
                    Served::NotYet(cause) => {
                        self.waiting_for_source(cause);
                        left.extend_from_slice(&pending[k..]);
                        break;
                    }
                }
            }
            self.spaces[i].pending = left;
        }
    }

    fn stalled(&mut self, cause: String) {
        let path = self.source.main.path.display().to_string();
        if self.retry.failed(cause.clone(), Instant::now()) {
            tracing::warn!(path, cause, "pages.img unreadable; faulting threads wait");
        }
    }

    /// Like [`stalled`](Self::stalled) for a late chunk the source has not written
    /// yet: the same bound (a source that never writes it loses the process), but
    /// retried at once, with no growing backoff: the wait for it (see
    /// `LateReader::wait_ready`) paces the retries.
    fn waiting_for_source(&mut self, cause: String) {
        if self.retry.not_yet(cause.clone(), Instant::now()) {
            tracing::warn!(
                cause,
                "waiting for the source to write late pages; faulting threads wait"
            );
        }
    }

    fn store_ok(&mut self) {
        if let Some(d) = self.retry.ok(Instant::now()) {
            tracing::info!(secs = d.as_secs_f64(), "pages.img readable again");
        }
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
        if !self.retry.due(Instant::now()) {
            return Served::Later;
        }
        let ra = self.opts.readahead.max(PAGE);
        let lo = s.max(addr.saturating_sub(ra / 8) & !(PAGE - 1));
        let hi = e.min(addr + ra);
        tracing::trace!(addr, lo, hi, s, e, "fault");
        match self.fill(i, lo, hi, o + (lo - s)) {
            Ok(_) if self.spaces[i].layout.missing.find(addr).is_some() => {
                // Stopped short of the faulting page (the layout is changing).
                Served::Again
            }
            Ok(n) => {
                self.progress.faulted_bytes += n;
                self.spaces[i].cursor = hi;
                self.store_ok();
                self.read_ahead_beyond(i, hi, addr + ra);
                Served::Done
            }
            Err(r) => r,
        }
    }

    /// The rest of a fault's read-ahead window `[from, to)` when the run holding the
    /// page ended before it: the following missing ranges (a pre-copy image's runs
    /// can be a few pages each), those already readable only; best effort.
    fn read_ahead_beyond(&mut self, i: usize, from: u64, to: u64) {
        let mut at = from;
        for _ in 0..MAX_RANGES_PER_STEP {
            let Some((s, e, o)) = self.spaces[i].layout.missing.next_from(at) else {
                return;
            };
            if s < at || s >= to {
                return; // wrapped around, or beyond the window
            }
            let hi = e.min(to);
            if !self.source.available(o, hi - s) {
                return;
            }
            match self.fill(i, s, hi, o) {
                Ok(n) => self.progress.faulted_bytes += n,
                Err(_) => return,
            }
            if self.spaces[i].dead {
                return;
            }
            self.spaces[i].cursor = hi;
            at = hi;
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
        let t0 = Instant::now();
        let data = match self.source.read(off, hi - lo) {
            Ok(d) => d,
            Err(e) if e.not_yet => return Err(Served::NotYet(e.msg)),
            Err(e) => return Err(Served::Store(e.msg)),
        };
        let t1 = Instant::now();
        self.read_time += t1 - t0;
        let r = Self::copy_in(&mut self.spaces[i], lo, hi, data);
        self.copy_time += t1.elapsed();
        r
    }

    /// Copies `data` to `[lo, hi)` of `sp` (see [`fill`](Self::fill)).
    fn copy_in(sp: &mut Space, lo: u64, hi: u64, data: &[u8]) -> Result<u64, Served> {
        let mut at = 0u64;
        let mut filled = 0u64;
        let len = hi - lo;
        // A copy must lie inside one vma (else ENOENT for all of it): after the
        // process split an area (mprotect, madvise), the rest goes page by page.
        let mut one_page = false;
        while at < len {
            let n = if one_page { PAGE } else { len - at };
            let src = &data[at as usize..(at + n) as usize];
            // Always wake: a thread may wait on a page of a prefetched range (its fault
            // not read yet); DONTWAKE would leave it asleep until we read its fault.
            match sp.uffd.copy(lo + at, src, false) {
                Ok(n) => {
                    filled += n;
                    at += n;
                }
                Err((n, e)) => {
                    filled += n;
                    at += n;
                    match e {
                        nix::errno::Errno::EEXIST => at += PAGE,
                        nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL if !one_page => {
                            one_page = true;
                        }
                        nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL => {
                            // Not registered at this page any more (unmapped, or
                            // mapped over): nothing to fill there.
                            tracing::debug!(addr = lo + at, errno = %e, "UFFDIO_COPY");
                            at += PAGE;
                        }
                        nix::errno::Errno::ESRCH => {
                            sp.dead = true;
                            break;
                        }
                        _ => {
                            // EAGAIN: the layout is changing (events first); ENOMEM and
                            // the like: later. Keep the rest missing.
                            sp.layout.missing.cut(lo, lo + at);
                            return if at > 0 {
                                Ok(filled)
                            } else {
                                Err(Served::Again)
                            };
                        }
                    }
                }
            }
        }
        sp.layout.missing.cut(lo, hi);
        Ok(filled)
    }

    /// Prefetches up to `prefetch_chunk` bytes of one address space, from its cursor
    /// on, across as many missing ranges as that takes (a pre-copy image's runs can
    /// be a few pages each).
    fn prefetch_one(&mut self) {
        let budget = self.opts.prefetch_chunk.max(PAGE);
        let Some(i) = (0..self.spaces.len())
            .find(|&i| !self.spaces[i].dead && !self.spaces[i].layout.missing.is_empty())
        else {
            return;
        };
        let mut filled = 0u64;
        // Bounded, so that a fault never waits long behind a prefetch step.
        for _ in 0..MAX_RANGES_PER_STEP {
            let sp = &self.spaces[i];
            let Some((s, e, o)) = sp.layout.missing.next_from(sp.cursor) else {
                break;
            };
            let lo = if s <= sp.cursor && sp.cursor < e {
                sp.cursor & !(PAGE - 1)
            } else {
                s
            };
            let hi = e.min(lo + (budget - filled));
            if !self.source.available(o + (lo - s), hi - lo) {
                self.prefetch_hold = Some(Instant::now() + Duration::from_millis(2));
                return;
            }
            self.prefetch_hold = None;
            match self.fill(i, lo, hi, o + (lo - s)) {
                Ok(n) => {
                    self.progress.prefetched_bytes += n;
                    self.spaces[i].cursor = hi;
                    self.store_ok();
                    filled += n;
                }
                Err(Served::Store(cause)) => return self.stalled(cause),
                Err(Served::NotYet(cause)) => return self.waiting_for_source(cause),
                Err(_) => return,
            }
            if filled >= budget || self.spaces[i].dead {
                return;
            }
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
                if self.link.is_none() {
                    // The stub's copy stays open (a resumed server cannot tell it to
                    // drop it): registrations we do not know of (an area grown by
                    // mremap) would keep waiting for a server. Unregister every area
                    // still registered for missing pages.
                    if let Some(pid) = sp.pid {
                        unregister_all(&sp.uffd, pid);
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

/// Unregisters every area of `pid` still registered for missing pages (`um` in its
/// smaps VmFlags).
fn unregister_all(uffd: &Uffd, pid: i32) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return;
    };
    for a in crate::engine::maps::parse_smaps(&text).unwrap_or_default() {
        if a.vmflags.iter().any(|f| f == "um") {
            if let Err(e) = uffd.unregister(a.start, a.end - a.start) {
                tracing::debug!(start = a.start, end = a.end, error = %e, "UFFDIO_UNREGISTER");
            }
        }
    }
}
