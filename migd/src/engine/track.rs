//! Pre-copy dumps: the pages of a RUNNING process are written to the image in rounds,
//! each round only those written since the previous one, so that the final freeze
//! has little left to write.
//!
//! Dirty tracking without soft-dirty bits: a userfaultfd is created inside the target
//! (injected `userfaultfd(2)`, taken with pidfd_getfd, closed in the target again) in
//! asynchronous write-protect mode (`UFFD_FEATURE_WP_ASYNC|WP_UNPOPULATED`); its
//! private writable areas are registered in `MODE_WP` from outside. The kernel then
//! resolves write faults by itself, only clearing the page's write-protect bit, and
//! `PAGEMAP_SCAN` on `/proc/PID/pagemap` reports the pages written since the last scan
//! and write-protects them again in the same walk (`PM_SCAN_WP_MATCHING`).
//!
//! The result is an ordinary version-1 image: the manifest's runs point at the latest
//! copy of each page; `pages.img` may also hold older copies that no run points to.
//!
//! What is not seen: memory the kernel writes through pages it pinned before a round
//! scanned them (an O_DIRECT read in progress, io_uring fixed buffers, vmsplice, RDMA)
//! faults no page, so such writes are not tracked; soft-dirty bits (CRIU's pre-dump)
//! miss them the same way.

use super::dump::{
    area_kind, area_record, collect_into, joined, precheck_areas, precheck_process, read_proc,
    sorted_joined, with_gadget, DumpError, EarlyLayout, FlagsCheck, MemSource, SAVED_ANYOF,
    SAVED_NOT,
};
use super::freeze::Frozen;
use super::image::{self, Area, AreaKind, Manifest, PageWriter};
use super::inject::InjectError;
use super::late::Deferral;
use super::maps::{parse_smaps, MapArea};
use super::procfs;
use super::throttle::Throttle;
use crate::sys::{self, kabi, uffd::Uffd};
use nix::errno::Errno;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// When to stop the rounds and freeze.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrecopyOptions {
    /// Rounds while the process runs, the first (everything) included; at least 1.
    pub max_rounds: u32,
    /// Freeze once a round (after the first) wrote at most this many bytes: the pages
    /// written during so short a round are few as well.
    pub stop_below_bytes: u64,
    /// Freeze once a round's scan finds more than this fraction of the previous
    /// round's bytes written again: the dirty set no longer shrinks, more rounds
    /// would not help. That round is not written (the freeze saves its pages).
    pub min_shrink: f64,
    /// When rounds stop shrinking, hold the process frozen up to this share of the
    /// time (percent; 0: never) before giving up on them (see `engine::throttle`).
    pub throttle_max_percent: u32,
}

impl Default for PrecopyOptions {
    fn default() -> Self {
        PrecopyOptions {
            max_rounds: 10,
            stop_below_bytes: 4 << 20,
            min_shrink: 0.8,
            throttle_max_percent: 0,
        }
    }
}

/// One round of a pre-copy dump, or (`frozen`) its final freeze.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoundReport {
    /// 1 for the first round; the final freeze comes after the last round.
    pub round: u32,
    /// The final freeze: the process was frozen for `ms`.
    pub frozen: bool,
    /// Pages written to pages.img in this round.
    pub pages: u64,
    pub bytes: u64,
    /// Final freeze only: pages saved in an earlier round and not written since.
    pub reused_pages: u64,
    /// Tracked areas saved in full at the freeze because their tracking was lost
    /// (mapped or remapped during the rounds); final freeze only.
    pub untracked_areas: usize,
    /// The share of the time the process was held frozen during the round
    /// (percent, see `engine::throttle`).
    pub throttle_percent: u32,
    pub ms: f64,
}

/// Where the latest copy of each saved page is in pages.img: extents of pages saved
/// together, `start -> (end, offset of start)`, non-overlapping; a later copy
/// replaces an earlier one page by page.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct OffsetMap {
    ext: BTreeMap<u64, (u64, u64)>,
}

impl OffsetMap {
    /// Forgets the pages in `[start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, u64, u64)> = self
            .ext
            .range(..end)
            .rev()
            .take_while(|(_, &(e, _))| e > start)
            .map(|(&s, &(e, o))| (s, e, o))
            .collect();
        for (s, e, o) in hit {
            self.ext.remove(&s);
            if s < start {
                self.ext.insert(s, (start, o));
            }
            if e > end {
                self.ext.insert(end, (e, o + (end - s)));
            }
        }
    }

    /// Records that `[start, end)` was saved at `off` (replacing older copies).
    pub fn insert(&mut self, start: u64, end: u64, off: u64) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        let (mut s, mut e, mut o) = (start, end, off);
        if let Some((&ps, &(pe, po))) = self.ext.range(..s).next_back() {
            if pe == s && po + (s - ps) == o {
                self.ext.remove(&ps);
                (s, o) = (ps, po);
            }
        }
        if let Some(&(ne, no)) = self.ext.get(&e) {
            if no == o + (e - s) {
                self.ext.remove(&e);
                e = ne;
            }
        }
        self.ext.insert(s, (e, o));
    }

    /// The offset of the page at `addr`, if saved.
    #[cfg(test)]
    pub fn get(&self, addr: u64) -> Option<u64> {
        let (&s, &(e, o)) = self.ext.range(..=addr).next_back()?;
        (addr < e).then(|| o + (addr - s))
    }

    /// The saved pieces of `[start, end)`, in address order, clipped to it:
    /// `(start, end, offset)`.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
        let first = self
            .ext
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        self.ext
            .range(first..end)
            .filter(|(_, &(e, _))| e > start)
            .map(|(&s, &(e, o))| {
                let cs = s.max(start);
                (cs, e.min(end), o + (cs - s))
            })
            .collect()
    }
}

/// An area's saved pages: `(first address, page count, offset in pages.img)`.
type Runs = Vec<(u64, u64, u64)>;

/// Runs `(address, pages, offset)` from pieces, joining those that continue each
/// other both in memory and in pages.img.
fn to_runs(pieces: &[(u64, u64, u64)], page: u64) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for &(s, e, o) in pieces {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 * page == s && last.2 + last.1 * page == o {
                last.1 += (e - s) / page;
                continue;
            }
        }
        out.push((s, (e - s) / page, o));
    }
    out
}

/// What [`Tracker::freeze_and_finish`] leaves: the process frozen and its image.
pub struct Finished {
    pub frozen: Frozen,
    pub manifest: Manifest,
    /// The manifest's bytes, not written yet: the caller writes them
    /// (`image::write_manifest_bytes`; the holder does so off the freeze's critical
    /// path) and hands them to the destination with `restore`.
    pub written: Vec<u8>,
    /// The freeze's round (`ms`: from the freeze to the manifest made).
    pub report: RoundReport,
    /// The late pages, if any (see `engine::late`).
    pub deferral: Option<Deferral>,
    /// Dropping it ends the tracking (after `check`, which needs it).
    pub uffd: Uffd,
    /// To pass before anything runs from the image (see `dump::EarlyLayout`).
    pub check: Option<FlagsCheck>,
}

/// A running process whose writes are being tracked, and the image being written.
/// Dropping it (without [`freeze_and_finish`](Self::freeze_and_finish)) closes the
/// userfaultfd, which unregisters every area and clears every write-protect bit
/// (the kernel does so when the last reference goes): the process runs on as it
/// was. The unfinished pages.img is removed.
pub struct Tracker {
    pid: i32,
    images: PathBuf,
    uffd: Option<Uffd>,
    /// The areas registered at the start.
    ranges: Vec<(u64, u64)>,
    src: MemSource,
    pw: Option<PageWriter>,
    map: OffsetMap,
    rounds: u32,
    finished: bool,
    /// Milliseconds of the final freeze's memory step: the scans (which pages to
    /// save, which were written: one PAGEMAP_SCAN per area), the range arithmetic,
    /// page copies (logged with the freeze's phases).
    final_ms: FinalMs,
    /// In a lazy dump with late pages, the eager windows (see `image::eager_windows`)
    /// whose pages the freeze writes again (see `final_tracked`).
    fresh: Option<Vec<(u64, u64)>>,
    /// The copy buffer, kept from round to round: a fresh 8 MiB `vec![0; n]` per
    /// call comes from the heap once glibc raised its mmap threshold, and is zeroed
    /// in full each time (~1 ms a call, one call per tracked area in the freeze).
    copy_buf: Vec<u8>,
    /// Byte ranges of pages.img whose copies were replaced since the last
    /// pages.ready record.
    replaced: Vec<(u64, u64)>,
    /// pages.img's length in the last pages.ready record.
    noted: u64,
    /// pages.img's length synced at the end of the last round, not said yet.
    synced: Option<u64>,
    /// Pages a round's scan found and no round wrote (see
    /// [`Tracker::keep_for_freeze`]): sorted, joined.
    unsaved: Option<Vec<(u64, u64)>>,
}

/// What a round's scan found to write (see [`Tracker::scan_round`]).
pub struct Scanned {
    /// The round it is (1 for the first).
    pub round: u32,
    /// Bytes to write: the total of `regions`.
    pub bytes: u64,
    regions: Vec<(u64, u64)>,
    t0: Instant,
}

/// pages.img bytes written within a round between two pages.ready records.
const READY_EVERY: u64 = 64 << 20;

#[derive(Debug, Default, Clone, Copy)]
struct FinalMs {
    /// The scans of the tracked areas (`MemSource::saved_and_written`).
    scan: f64,
    /// What to save, from the scans and the copies already written.
    ranges: f64,
    copy: f64,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn other(pid: i32, what: impl Into<String>) -> DumpError {
    DumpError::Other {
        pid,
        what: what.into(),
    }
}

/// Areas whose writes are tracked: private writable memory the dump saves pages of
/// (anonymous, heap, stack, private file mappings). Others are saved in full at the
/// freeze.
fn trackable(a: &MapArea, kind: &AreaKind) -> bool {
    !a.shared
        && a.prot & libc::PROT_WRITE != 0
        && matches!(kind, AreaKind::Anon | AreaKind::File { .. })
}

impl Tracker {
    /// Starts tracking the writes of `pid` and opens the image in `images` (its
    /// pages.img is rewritten; a manifest already there is removed, so that no
    /// half-written image reads as whole). The process is frozen briefly: refusals
    /// (see `dump::precheck`) come before anything is injected.
    pub fn start(pid: i32, images: &Path) -> Result<Tracker, DumpError> {
        let _span = tracing::info_span!("precopy_start", pid).entered();
        super::dump::prepare(pid, images)?;
        let manifest = images.join(image::MANIFEST_FILE);
        match std::fs::remove_file(&manifest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(DumpError::Proc {
                    path: manifest.display().to_string(),
                    source: e,
                })
            }
            _ => {}
        }
        let frozen = Frozen::freeze(pid)?;
        let t0 = Instant::now();
        precheck_process(pid)?;
        let smaps = parse_smaps(&read_proc(format!("/proc/{pid}/smaps"))?)
            .map_err(|e| other(pid, e.to_string()))?;
        precheck_areas(pid, &smaps)?;
        let uffd = inject_userfaultfd(pid, &frozen, &smaps)?;
        let want = kabi::UFFD_FEATURE_WP_ASYNC | kabi::UFFD_FEATURE_WP_UNPOPULATED;
        let got = uffd
            .api(want)
            .map_err(|e| other(pid, format!("UFFDIO_API(WP_ASYNC|WP_UNPOPULATED): {e}")))?;
        if got & want != want {
            return Err(other(
                pid,
                format!(
                    "the kernel does not offer asynchronous write-protect tracking \
                     (features {got:#x}); pre-copy needs Linux 6.7+; dump without --precopy"
                ),
            ));
        }
        // Registered while the process is frozen, so that the layout is the one read.
        // No UFFDIO_WRITEPROTECT here: the first round's scan write-protects the
        // populated pages as it reports them, and leaving empty page tables alone
        // keeps huge sparse reservations cheap (no pte markers installed).
        let mut ranges = Vec::new();
        for a in &smaps {
            let Some(kind) = area_kind(pid, a)? else {
                continue;
            };
            if !trackable(a, &kind) {
                continue;
            }
            match uffd.register(a.start, a.len(), kabi::UFFDIO_REGISTER_MODE_WP) {
                Ok(_) => ranges.push((a.start, a.end)),
                Err(e) => tracing::debug!(
                    "not tracking {:#x}-{:#x} {}: UFFDIO_REGISTER: {e}",
                    a.start,
                    a.end,
                    a.name
                ),
            }
        }
        let src = MemSource::open(pid)?;
        let pw = PageWriter::create(images)?;
        frozen.thaw();
        let frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
        tracing::info!(areas = ranges.len(), frozen_ms, "tracking writes");
        Ok(Tracker {
            pid,
            images: images.to_path_buf(),
            uffd: Some(uffd),
            ranges,
            src,
            pw: Some(pw),
            map: OffsetMap::default(),
            rounds: 0,
            finished: false,
            final_ms: FinalMs::default(),
            fresh: None,
            copy_buf: Vec::new(),
            replaced: Vec::new(),
            noted: 0,
            synced: None,
            unsaved: None,
        })
    }

    /// The freeze closes pages.img without syncing it (close(2) still says whether
    /// it reached the store's server); the caller syncs the image after the freeze
    /// (`image::sync_image`).
    pub fn defer_sync(&mut self) {
        if let Some(pw) = self.pw.as_mut() {
            pw.without_sync();
        }
    }

    /// The pid being tracked.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The scan of one round while the process runs: the first finds every
    /// populated page of the tracked areas, later ones the pages written since the
    /// previous scan (and write-protects them again). Hand the result to
    /// [`write_round`](Self::write_round), or to [`keep_for_freeze`](Self::keep_for_freeze)
    /// if the round is not worth writing: either way its pages are not lost.
    pub fn scan_round(&mut self) -> Result<Scanned, DumpError> {
        let t0 = Instant::now();
        let round = self.rounds + 1;
        let pid = self.pid;
        let required = if round == 1 { 0 } else { kabi::PAGE_IS_WRITTEN };
        let mut regions = self.unsaved.take().unwrap_or_default();
        for &(start, end) in &self.ranges {
            // No PM_SCAN_CHECK_WPASYNC: areas mapped over a tracked one since the
            // start are not tracked and are skipped silently (saved at the freeze).
            let found = self
                .src
                .scan(
                    start,
                    end,
                    kabi::PM_SCAN_WP_MATCHING,
                    required,
                    SAVED_NOT,
                    SAVED_ANYOF,
                )
                .map_err(|e| match e {
                    Errno::ESRCH => other(
                        pid,
                        format!("the process exited during pre-copy round {round}"),
                    ),
                    e => other(
                        pid,
                        format!("PAGEMAP_SCAN of {start:#x}-{end:#x} (round {round}): {e}"),
                    ),
                })?;
            regions.extend(found);
        }
        let regions = sorted_joined(regions);
        Ok(Scanned {
            round,
            bytes: total(&regions),
            regions,
            t0,
        })
    }

    /// Pages a scan found and no round writes: the freeze saves them (the scan
    /// write-protected them again, so the freeze's own scan does not see them as
    /// written).
    pub fn keep_for_freeze(&mut self, s: Scanned) {
        self.unsaved = Some(s.regions);
    }

    /// Writes what [`scan_round`](Self::scan_round) found: one round while the
    /// process runs.
    pub fn write_round(&mut self, s: Scanned) -> Result<RoundReport, DumpError> {
        let Scanned {
            round, regions, t0, ..
        } = s;
        self.rounds = round;
        let pid = self.pid;
        // Every saved copy of this round's pages is replaced now (by its new copy,
        // or, unreadable in this round, forgotten), and said so in the next
        // pages.ready record: the destination need not read them. The last round's
        // pages, synced at its end, are announced now that another round follows
        // (the last round's never are, so that the destination does not read them
        // in the freeze that follows it).
        for &(s, e) in &regions {
            self.note_replaced(s, e);
        }
        if let Some(len) = self.synced.take() {
            self.note_ready(len);
        }
        let mut pw = self
            .pw
            .take()
            .ok_or_else(|| other(pid, "page writer gone"))?;
        let copied = self.copy_regions(&regions, false, &mut pw);
        // This round's last pages leave the page writer's buffer now, while the
        // process runs, not in the freeze.
        let flushed = pw.flush();
        self.pw = Some(pw);
        let bytes = copied?;
        flushed?;
        // Push this round's pages to the disk now, while the process runs, so that
        // the final fsync (in the freeze) has only the freeze's own pages to write.
        let path = self.images.join(image::PAGES_FILE);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_data())
            .map_err(|source| DumpError::Proc {
                path: path.display().to_string(),
                source,
            })?;
        // The destination may read what is below this while the next rounds run
        // (said when the next round starts).
        self.synced = Some(self.pw.as_ref().map_or(0, image::PageWriter::offset));
        Ok(RoundReport {
            round,
            frozen: false,
            pages: bytes / sys::page_size(),
            bytes,
            ms: t0.elapsed().as_secs_f64() * 1e3,
            ..RoundReport::default()
        })
    }

    /// The saved copies of `[start, end)` are being replaced: the next pages.ready
    /// record lists their byte ranges.
    fn note_replaced(&mut self, start: u64, end: u64) {
        let copies = self.map.pieces(start, end);
        self.replaced
            .extend(copies.into_iter().map(|(s, e, o)| (o, o + (e - s))));
    }

    /// Appends a pages.ready record: pages.img's first `len` bytes are on the
    /// store's server (a failure only means the destination reads them later).
    fn note_ready(&mut self, len: u64) {
        let replaced = sorted_joined(std::mem::take(&mut self.replaced));
        if let Err(e) = image::note_pages_ready(&self.images, len, replaced) {
            tracing::debug!(error = %e, "pages.ready not written: the destination reads these pages later");
        }
        self.noted = len;
    }

    /// Within a round, every [`READY_EVERY`] bytes: pushes what pages.img holds to
    /// the store's server (a flush of the writer's buffer, then an open and close
    /// of the file: close(2) drains this node's write-behind) and says so in
    /// pages.ready, so that the destination reads a long round's pages while it
    /// goes on. Not synced to the disk: the round's end does that.
    fn note_ready_within(&mut self, pw: &mut PageWriter) {
        let len = pw.offset();
        if len - self.noted < READY_EVERY {
            return;
        }
        let path = self.images.join(image::PAGES_FILE);
        let pushed = pw.flush().map_err(|e| e.to_string()).and_then(|()| {
            std::fs::File::open(&path)
                .and_then(sys::close_checked)
                .map_err(|e| e.to_string())
        });
        match pushed {
            Ok(()) => self.note_ready(len),
            Err(e) => {
                tracing::debug!(error = %e, "pages.img not pushed within the round");
                self.noted = len;
            }
        }
    }

    /// Copies `regions` to pages.img in gathered reads of up to 8 MiB (one
    /// process_vm_readv for many scattered pages) and records where each went.
    /// A region that cannot be read is forgotten (its older copy must not be used);
    /// with `strict` (the process is frozen) it is an error instead.
    fn copy_regions(
        &mut self,
        regions: &[(u64, u64)],
        strict: bool,
        pw: &mut PageWriter,
    ) -> Result<u64, DumpError> {
        const BATCH: u64 = 8 << 20;
        const IOV: usize = 512;
        let pid = self.pid;
        if regions.is_empty() {
            return Ok(0);
        }
        let mut buf = std::mem::take(&mut self.copy_buf);
        buf.resize(BATCH as usize, 0);
        let copied = {
            // Pieces of at most BATCH bytes.
            let mut pieces = Vec::new();
            for &(s, e) in regions {
                let mut a = s;
                while a < e {
                    let n = (e - a).min(BATCH);
                    pieces.push((a, n));
                    a += n;
                }
            }
            let mut written = 0u64;
            let mut i = 0;
            while i < pieces.len() {
                let mut j = i;
                let mut total = 0u64;
                while j < pieces.len() && j - i < IOV && total + pieces[j].1 <= BATCH {
                    total += pieces[j].1;
                    j += 1;
                }
                let batch = &pieces[i..j];
                let remote: Vec<nix::sys::uio::RemoteIoVec> = batch
                    .iter()
                    .map(|&(a, n)| nix::sys::uio::RemoteIoVec {
                        base: a as usize,
                        len: n as usize,
                    })
                    .collect();
                let got = {
                    let mut local = [std::io::IoSliceMut::new(&mut buf[..total as usize])];
                    nix::sys::uio::process_vm_readv(
                        nix::unistd::Pid::from_raw(pid),
                        &mut local,
                        &remote,
                    )
                    .unwrap_or(0) as u64
                };
                // Which pieces are in `buf`: those read whole; the rest one by one.
                let mut ok = vec![false; batch.len()];
                let mut at = 0u64;
                for (k, &(a, n)) in batch.iter().enumerate() {
                    let slot = &mut buf[at as usize..(at + n) as usize];
                    ok[k] = at + n <= got
                        || sys::vm_read_exact(pid, a, slot).is_ok()
                        || self.src.read_forced(a, slot).is_ok();
                    if !ok[k] && strict {
                        return Err(DumpError::Memory {
                            pid,
                            addr: a,
                            len: n as usize,
                            errno: Errno::EFAULT,
                        });
                    }
                    at += n;
                }
                let mut at = 0u64;
                for (k, &(a, n)) in batch.iter().enumerate() {
                    if ok[k] {
                        let off = pw.write(&buf[at as usize..(at + n) as usize])?;
                        self.map.insert(a, a + n, off);
                        written += n;
                    } else {
                        tracing::debug!("{a:#x} ({n} bytes) unreadable in this round");
                        self.map.remove(a, a + n);
                    }
                    at += n;
                }
                // (Not after the round's last batch: the round's end is said
                // when the next round starts, see `write_round`.)
                if !strict && j < pieces.len() {
                    self.note_ready_within(pw);
                }
                i = j;
            }
            Ok(written)
        };
        self.copy_buf = buf;
        copied
    }

    /// Freezes the process and completes the image: the pages written since the last
    /// round, areas that lost their tracking in full, then everything else as
    /// `dump::collect` does; makes the manifest (not written: see
    /// [`Finished::written`]). Returns the frozen process, the manifest, the
    /// freeze's report (`ms`: from the freeze to the manifest made), the flags
    /// check and the userfaultfd: dropping it ends the tracking (the kernel
    /// unregisters every area and clears their write-protect bits, a walk of all the
    /// tracked memory, ~15 ms for 1 GiB), which the caller does off the freeze's
    /// critical path but before the process thaws. On error the process thaws and
    /// runs on as it was, the userfaultfd closed.
    ///
    /// With `late`, the pages still to write of areas a lazy restore serves on demand
    /// are left for a [`crate::engine::late::Flusher`] (see `dump::collect_deferring`),
    /// returned as the [`Deferral`].
    pub fn freeze_and_finish(mut self, late: bool) -> Result<Finished, DumpError> {
        let pid = self.pid;
        let was_stopped = read_proc(format!("/proc/{pid}/status"))
            .map(|s| procfs::status_field(&s, "State").is_some_and(|v| v.starts_with('T')))
            .unwrap_or(false);
        // The smaps walk while it still runs (see `dump::EarlyLayout`), and the
        // late files made (round trips to the store).
        let early = EarlyLayout::read(pid)?;
        if late {
            crate::engine::late::create_files(&self.images)?;
        }
        let t_freeze = Instant::now();
        let frozen = Frozen::freeze(pid)?;
        let freeze_op_ms = ms_since(t_freeze);
        let t0 = Instant::now();
        let mut ph = crate::phases::Phases::new("precopy_freeze");
        // The device-mapping refusal is checked on the layout collect reads anyway
        // (one smaps walk less in the freeze).
        precheck_process(pid)?;
        ph.mark("precheck");
        let pw = self
            .pw
            .take()
            .ok_or_else(|| other(pid, "page writer gone"))?;
        let mut report = RoundReport {
            round: self.rounds + 1,
            frozen: true,
            ..RoundReport::default()
        };
        let mut deferral = None;
        let (mut manifest, check) =
            collect_into(pid, &frozen, pw, Some(&early), &mut |smaps, threads, pw| {
                precheck_areas(pid, smaps)?;
                deferral = late.then(|| Deferral::new(threads));
                self.fresh = late.then(|| image::eager_windows(threads, sys::page_size()));
                self.final_memory(smaps, pw, &mut report, deferral.as_mut())
            })?;
        ph.mark("collect");
        manifest.stopped = was_stopped;
        crate::engine::late::seal(&mut manifest, deferral.as_ref());
        ph.mark("late files");
        let written = image::manifest_bytes(&self.images, &manifest)?;
        ph.mark("manifest");
        report.ms = t0.elapsed().as_secs_f64() * 1e3;
        self.finished = true;
        // Closing the last reference unregisters every area (fs/userfaultfd.c,
        // userfaultfd_release), so a thawed process carries nothing of the tracking.
        let uffd = self
            .uffd
            .take()
            .ok_or_else(|| other(pid, "userfaultfd gone"))?;
        let f = self.final_ms;
        tracing::debug!(
            freeze_op_ms,
            scan_ms = f.scan,
            ranges_ms = f.ranges,
            copy_ms = f.copy,
            bytes = report.bytes,
            "phases: {}",
            ph.summary()
        );
        Ok(Finished {
            frozen,
            manifest,
            written,
            report,
            deferral,
            uffd,
            check,
        })
    }

    /// The memory step of the final freeze.
    fn final_memory(
        &mut self,
        smaps: &[MapArea],
        pw: &mut PageWriter,
        report: &mut RoundReport,
        mut deferral: Option<&mut Deferral>,
    ) -> Result<Vec<Area>, DumpError> {
        let pid = self.pid;
        let mut out = Vec::new();
        for a in smaps {
            let Some(kind) = area_kind(pid, a)? else {
                continue;
            };
            let mut defer = deferral
                .as_deref_mut()
                .filter(|_| Deferral::applies(a, &kind));
            // `uw`: still registered in write-protect mode. Only ours can be: a
            // process holding a userfaultfd is refused by precheck.
            let tracked = trackable(a, &kind)
                && a.has_flag("uw")
                && self.ranges.iter().any(|&(s, e)| s < a.end && a.start < e);
            let runs = match tracked {
                true => match self.final_tracked(a, &kind, pw, report, defer.as_deref_mut())? {
                    Some(r) => r,
                    None => {
                        report.untracked_areas += 1;
                        self.save_full(a, &kind, pw, report, defer)?
                    }
                },
                false => {
                    if trackable(a, &kind) {
                        report.untracked_areas += 1;
                    }
                    self.save_full(a, &kind, pw, report, defer)?
                }
            };
            out.push(area_record(a, kind, runs));
        }
        Ok(out)
    }

    fn save_full(
        &mut self,
        a: &MapArea,
        kind: &AreaKind,
        pw: &mut PageWriter,
        report: &mut RoundReport,
        defer: Option<&mut Deferral>,
    ) -> Result<Vec<(u64, u64, u64)>, DumpError> {
        let runs = self.src.save_area(a, kind, pw, defer)?;
        let pages: u64 = runs.iter().map(|r| r.1).sum();
        report.pages += pages;
        report.bytes += pages * sys::page_size();
        Ok(runs)
    }

    /// Runs of a tracked area at the freeze: the pages the dump saves (as `collect`
    /// chooses them); those saved in a round and not written since keep their copy,
    /// the others are written now. In a lazy dump with late pages (`self.fresh`),
    /// the pages a lazy restore fills before the process runs (areas not served
    /// lazily; each thread's stack and rseq windows) are written again now all the
    /// same: the destination then reads the freeze's few chunks of pages.img before
    /// the process runs, not chunks of every round. `None` if the area turns out not
    /// to be tracked after all (then it is saved in full).
    fn final_tracked(
        &mut self,
        a: &MapArea,
        kind: &AreaKind,
        pw: &mut PageWriter,
        report: &mut RoundReport,
        defer: Option<&mut Deferral>,
    ) -> Result<Option<Runs>, DumpError> {
        let pid = self.pid;
        let page = sys::page_size();
        let t = Instant::now();
        // The pages to save and those written since the last round: one walk.
        let (wanted, dirty) = match self.src.saved_and_written(a, kind) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(
                    "{:#x}-{:#x} {}: final PAGEMAP_SCAN: {e}; saving it in full",
                    a.start,
                    a.end,
                    a.name
                );
                return Ok(None);
            }
        };
        self.final_ms.scan += ms_since(t);
        let t = Instant::now();
        // Pages a round found written and did not save count as written.
        let dirty = match &self.unsaved {
            Some(kept) => union(&dirty, &intersect(kept, &[(a.start, a.end)])),
            None => dirty,
        };
        let copies = joined(
            self.map
                .pieces(a.start, a.end)
                .into_iter()
                .map(|(s, e, _)| (s, e)),
        );
        let again = match (&self.fresh, defer.is_some()) {
            (None, _) => dirty,
            (Some(_), false) => vec![(a.start, a.end)],
            (Some(windows), true) => union(&dirty, windows),
        };
        let to_save = union(&subtract(&wanted, &copies), &intersect(&wanted, &again));
        report.reused_pages += (total(&wanted) - total(&to_save)) / page;
        self.final_ms.ranges += ms_since(t);
        let to_save = match defer {
            None => to_save,
            Some(d) => {
                // Late pages get their place in late.img now, their bytes after.
                let mut now = Vec::new();
                for &(s, e) in &to_save {
                    for (ps, pe, late) in d.split(s, e) {
                        match late {
                            true => {
                                let off = d.defer(ps, pe);
                                self.map.insert(ps, pe, off);
                            }
                            false => now.push((ps, pe)),
                        }
                    }
                }
                now
            }
        };
        let t = Instant::now();
        let bytes = self.copy_regions(&to_save, true, pw)?;
        self.final_ms.copy += ms_since(t);
        report.bytes += bytes;
        report.pages += bytes / page;
        let mut pieces = Vec::new();
        for &(s, e) in &wanted {
            let got = self.map.pieces(s, e);
            let covered: u64 = got.iter().map(|p| p.1 - p.0).sum();
            if covered != e - s {
                return Err(other(
                    pid,
                    format!("pre-copy: pages of {s:#x}-{e:#x} have no saved copy (engine bug)"),
                ));
            }
            pieces.extend(got);
        }
        Ok(Some(to_runs(&pieces, page)))
    }
}

// Address ranges `[start, end)`: sorted, disjoint, adjacent ones joined.

fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    sorted_joined([a, b].concat())
}

fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    joined(out)
}

fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        while j < b.len() && b[j].1 <= s {
            j += 1;
        }
        let mut at = s;
        let mut k = j;
        while at < e {
            match b.get(k) {
                Some(&(bs, be)) if bs < e => {
                    if bs > at {
                        out.push((at, bs));
                    }
                    at = at.max(be);
                    k += 1;
                }
                _ => {
                    out.push((at, e));
                    at = e;
                }
            }
        }
    }
    joined(out)
}

fn total(r: &[(u64, u64)]) -> u64 {
    r.iter().map(|(s, e)| e - s).sum()
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // The userfaultfd closes with the struct (see the type's documentation).
        if !self.finished {
            let _ = std::fs::remove_file(self.images.join(image::PAGES_FILE));
        }
    }
}

/// Creates a userfaultfd inside the frozen process, takes it with pidfd_getfd and
/// closes the target's descriptor again.
fn inject_userfaultfd(pid: i32, frozen: &Frozen, smaps: &[MapArea]) -> Result<Uffd, DumpError> {
    with_gadget(pid, frozen, smaps, |inj, _| {
        let leader = &frozen.threads[0];
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let what = || "userfaultfd(O_CLOEXEC|O_NONBLOCK)".to_string();
        let fd = match inj.ok(leader, kabi::SYS_USERFAULTFD, &[flags], what) {
            // Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd = 0, only
            // user-mode-only descriptors may be created. Asynchronous write-protect
            // faults are resolved before that mode is looked at (mm/memory.c,
            // do_wp_page), so kernel-mode writes are tracked all the same.
            Err(InjectError::Failed {
                errno: Errno::EPERM,
                ..
            }) => inj.ok(
                leader,
                kabi::SYS_USERFAULTFD,
                &[flags | kabi::UFFD_USER_MODE_ONLY],
                || "userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY)".into(),
            )?,
            r => r?,
        };
        let taken = sys::pidfd_open(pid).and_then(|p| sys::pidfd_getfd(p.as_raw_fd(), fd as i32));
        let closed = inj.ok(leader, libc::SYS_close, &[fd as u64], || {
            format!("close({fd}) (the injected userfaultfd)")
        });
        let ours =
            taken.map_err(|e| other(pid, format!("pidfd_getfd of its userfaultfd {fd}: {e}")))?;
        closed?;
        Ok(Uffd::from_fd(ours))
    })
}

/// Runs rounds on `t` until `opts` says to freeze, reporting each to `progress`.
/// Each round's size is known from its scan, before its pages are written. A round
/// that would not shrink the dirty set enough raises the throttle (see
/// `engine::throttle`: the process held frozen a share of the time, up to
/// `opts.throttle_max_percent`) and is written; once the throttle is at its most (or
/// off), such a round is not written at all (its pages are left to the freeze), so a
/// process writing faster than the store takes pages costs one round, not two.
pub fn run_rounds(
    t: &mut Tracker,
    opts: &PrecopyOptions,
    progress: &mut dyn FnMut(&RoundReport),
) -> Result<(), DumpError> {
    let mut prev: Option<u64> = None;
    let mut throttle: Option<Throttle> = None;
    loop {
        let scanned = t.scan_round()?;
        let percent = throttle.as_ref().map_or(0, Throttle::percent);
        if let Some(p) = prev {
            let shrinks = scanned.bytes as f64 <= p as f64 * opts.min_shrink;
            if scanned.bytes > opts.stop_below_bytes && !shrinks {
                match next_throttle(percent, opts.throttle_max_percent) {
                    Some(more) => {
                        tracing::info!(
                            round = scanned.round,
                            bytes = scanned.bytes,
                            previous = p,
                            "pre-copy does not converge (it writes its memory about as \
                             fast as the store takes it): holding the process frozen \
                             {more}% of the time"
                        );
                        match &throttle {
                            Some(th) => th.set(more),
                            None => throttle = Some(Throttle::start(t.pid(), more)),
                        }
                    }
                    None => {
                        tracing::info!(
                            round = scanned.round,
                            bytes = scanned.bytes,
                            previous = p,
                            throttle_percent = percent,
                            "pre-copy stops: the pages written since the last round are \
                             not fewer than {:.0}% of it; the freeze saves them",
                            opts.min_shrink * 100.0
                        );
                        t.keep_for_freeze(scanned);
                        break;
                    }
                }
            }
        }
        let mut r = t.write_round(scanned)?;
        r.throttle_percent = throttle.as_ref().map_or(0, Throttle::percent);
        tracing::info!(
            round = r.round,
            bytes = r.bytes,
            ms = r.ms,
            throttle_percent = r.throttle_percent,
            "pre-copy round"
        );
        progress(&r);
        if r.round >= opts.max_rounds.max(1) || (r.round > 1 && r.bytes <= opts.stop_below_bytes) {
            break;
        }
        prev = Some(r.bytes);
    }
    if let Some(th) = throttle {
        let held = th.stop();
        tracing::info!(
            held_ms = held.as_secs_f64() * 1e3,
            "pre-copy throttle ended"
        );
    }
    Ok(())
}

/// The throttle after `percent` when the rounds do not shrink: 50%, then half of
/// what is left each time, up to `max`; `None` if it cannot rise.
fn next_throttle(percent: u32, max: u32) -> Option<u32> {
    let next = match percent {
        0 => 50,
        p => p + (100 - p) / 2,
    }
    .min(max);
    (next > percent).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn later_copies_replace_earlier_ones_page_by_page() {
        let mut m = OffsetMap::default();
        m.insert(0, 10 * P, 0);
        m.insert(3 * P, 5 * P, 100 * P);
        assert_eq!(m.get(2 * P), Some(2 * P));
        assert_eq!(m.get(3 * P), Some(100 * P));
        assert_eq!(m.get(4 * P), Some(101 * P));
        assert_eq!(m.get(5 * P), Some(5 * P));
        assert_eq!(m.get(10 * P), None);
        assert_eq!(
            m.pieces(P, 9 * P),
            vec![
                (P, 3 * P, P),
                (3 * P, 5 * P, 100 * P),
                (5 * P, 9 * P, 5 * P)
            ]
        );
        m.remove(4 * P, 6 * P);
        assert_eq!(m.get(4 * P), None);
        assert_eq!(m.get(5 * P), None);
        assert_eq!(m.get(6 * P), Some(6 * P));
        assert_eq!(m.get(3 * P), Some(100 * P));
    }

    #[test]
    fn range_sets_join_cut_and_meet_as_sets_of_pages_do() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 25), (30, 40), (45, 60)];
        assert_eq!(union(&a, &b), vec![(0, 60)]);
        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25), (45, 50)]);
        assert_eq!(subtract(&a, &b), vec![(0, 5), (25, 30), (40, 45)]);
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(0, 10), (20, 30), (40, 100)]
        );
        assert_eq!(
            intersect(&[(0, 100)], &[(10, 20), (30, 40)]),
            vec![(10, 20), (30, 40)]
        );
        // Page by page, the same as a brute-force walk.
        let pages = |r: &[(u64, u64)]| -> Vec<u64> { r.iter().flat_map(|&(s, e)| s..e).collect() };
        let x = [(1, 4), (6, 9), (12, 13)];
        let y = [(0, 2), (3, 7), (8, 12)];
        let inx = |p: u64| pages(&x).contains(&p);
        let iny = |p: u64| pages(&y).contains(&p);
        let all: Vec<u64> = (0..15).collect();
        assert_eq!(
            pages(&subtract(&x, &y)),
            all.iter()
                .copied()
                .filter(|&p| inx(p) && !iny(p))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            pages(&intersect(&x, &y)),
            all.iter()
                .copied()
                .filter(|&p| inx(p) && iny(p))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            pages(&union(&x, &y)),
            all.iter()
                .copied()
                .filter(|&p| inx(p) || iny(p))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_throttle_rises_by_halves_of_what_is_left_up_to_its_most() {
        assert_eq!(next_throttle(0, 90), Some(50));
        assert_eq!(next_throttle(50, 90), Some(75));
        assert_eq!(next_throttle(75, 90), Some(87));
        assert_eq!(next_throttle(87, 90), Some(90));
        assert_eq!(next_throttle(90, 90), None);
        assert_eq!(next_throttle(0, 0), None, "0: no throttle");
        assert_eq!(next_throttle(0, 30), Some(30));
    }

    #[test]
    fn contiguous_copies_join_into_one_extent_and_one_run() {
        let mut m = OffsetMap::default();
        m.insert(0, 2 * P, 0);
        m.insert(2 * P, 4 * P, 2 * P);
        assert_eq!(m.ext.len(), 1, "{m:?}");
        m.insert(6 * P, 7 * P, 4 * P);
        let runs = to_runs(&m.pieces(0, 8 * P), P);
        assert_eq!(runs, vec![(0, 4, 0), (6 * P, 1, 4 * P)]);
        // Adjacent in memory but not in the file: two runs.
        let runs = to_runs(&[(0, P, 0), (P, 2 * P, 5 * P)], P);
        assert_eq!(runs, vec![(0, 1, 0), (P, 1, 5 * P)]);
    }
}
