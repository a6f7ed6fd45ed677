//! Late pages: the lazy migration of docs/lazy.md, "Late pages". The source freezes
//! the process and writes, at the freeze, everything but the pages of its private
//! anonymous memory (except those near each thread's stack pointer and rseq area,
//! which a lazy restore fills before the process runs); the destination starts at
//! once, and the rest is written to late.img in the background while the original
//! stays frozen, the chunks the destination is faulting on first.
//!
//! The two sides meet only in the image directory on the store:
//! - late.ready: the flusher appends `(chunk + 1, crc32c)` once a chunk of late.img is
//!   written; the destination reads a chunk only once it is listed, and checks it;
//! - late.want: the destination appends the chunk numbers (+ 1) it waits for (served
//!   before the rest), and [`image::LATE_DONE`] once every page is in.
//!
//! Numbers are stored plus one so that a record still zero (a hole the reader's view
//! of the file may show while a write is on its way) is never taken for chunk 0: a
//! reader stops at it and reads again from there. Every write reaches fs-server
//! before the next starts: the flusher keeps late.img and late.ready open and
//! flushes the handle after each write ([`sys::flush_checked`]); late.want's writer
//! opens and closes it for each record. The reader opens the file for each look,
//! drops its node's cached pages of the part it reads next and asks for the size
//! afresh ([`fresh_view`]): a page cached while the file was shorter holds zeros
//! where the other side's later writes are.
//!
//! Dump side: [`Deferral`] (which pages wait, where they will go). Source side after
//! the freeze: [`Flusher`]. Destination side: [`LateReader`].

use super::image::{self, AreaKind, ThreadImage, CHUNK, LATE};
use super::maps::MapArea;
use crate::sys;
use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pages of one run written late: `len` bytes at `addr` go to late.img at `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateRun {
    pub addr: u64,
    pub len: u64,
    pub off: u64,
}

/// What a lazy dump leaves for after the freeze, decided while the image is written.
#[derive(Debug, Default)]
pub struct Deferral {
    windows: Vec<(u64, u64)>,
    runs: Vec<LateRun>,
    len: u64,
}

impl Deferral {
    /// Late pages for a process with these threads (their stack and rseq windows
    /// stay in pages.img).
    pub fn new(threads: &[ThreadImage]) -> Deferral {
        Deferral {
            windows: image::eager_windows(threads, sys::page_size()),
            ..Deferral::default()
        }
    }

    /// Whether pages of `a` may be written late: exactly the areas a lazy restore
    /// serves on demand ([`image::lazy_kind`]).
    pub fn applies(a: &MapArea, kind: &AreaKind) -> bool {
        image::lazy_kind(kind, a.shared, &[]) && !a.has_flag("wf")
    }

    /// `[s, e)` cut into pieces `(start, end, late)`: the parts inside a window are
    /// written now (`late == false`).
    pub fn split(&self, s: u64, e: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut at = s;
        for &(ws, we) in &self.windows {
            if we <= at || ws >= e {
                continue;
            }
            if ws > at {
                out.push((at, ws, true));
            }
            let hi = we.min(e);
            out.push((at.max(ws), hi, false));
            at = hi;
        }
        if at < e {
            out.push((at, e, true));
        }
        out
    }

    /// Reserves late.img room for `[s, e)`; returns the run offset (with [`LATE`]).
    pub fn defer(&mut self, s: u64, e: u64) -> u64 {
        let off = self.len;
        match self.runs.last_mut() {
            Some(r) if r.addr + r.len == s && r.off + r.len == off => r.len += e - s,
            _ => self.runs.push(LateRun {
                addr: s,
                len: e - s,
                off,
            }),
        }
        self.len += e - s;
        off | LATE
    }

    /// Bytes left for after the freeze.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The runs, in late.img order.
    pub fn into_runs(self) -> Vec<LateRun> {
        self.runs
    }
}

/// Records a lazy dump's deferral in its manifest (`late_len`); nothing without one.
/// Before the manifest is written; the late files were made before the freeze
/// ([`create_files`]).
pub(crate) fn seal(m: &mut image::Manifest, deferral: Option<&Deferral>) {
    if let Some(d) = deferral {
        m.late_len = d.len();
    }
}

/// Creates late.img, late.ready and late.want (empty) in `images`, before the
/// freeze (each create is a round trip to the store's server, a millisecond or
/// so that the freeze need not wait for): the manifest, written last, then names
/// files a destination finds.
pub(crate) fn create_files(images: &Path) -> Result<(), super::dump::DumpError> {
    for name in [
        image::LATE_FILE,
        image::LATE_READY_FILE,
        image::LATE_WANT_FILE,
    ] {
        let path = images.join(name);
        File::create(&path).map_err(|source| super::dump::DumpError::Proc {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// How a flush ended.
#[derive(Debug, Clone, PartialEq)]
pub enum FlushEnd {
    /// Every late page is in late.img (synced): nothing depends on the source.
    Done { bytes: u64, ms: f64 },
    /// The destination needs nothing more (it said so, or the image is gone).
    NotNeeded { bytes: u64, why: String },
    /// Stopped by [`Flusher::stop`] (the migration was abandoned).
    Stopped,
    /// The store stayed unwritable past the bound: pages were not written.
    Failed(String),
}

/// How a flush goes.
#[derive(Debug, Clone, Copy)]
pub struct LateOptions {
    /// How long the store may stay unwritable before the flush gives up.
    pub store_bound: Duration,
    /// Cap on chunks nobody waits for, in bytes per second (0: none); wanted chunks
    /// are never held back. For tests and measurements.
    pub background_rate: u64,
    /// Write only the chunks the destination asks for until [`Flusher::release`]:
    /// a migration's source holds the rest back while the destination restores
    /// (the freeze), so that the writing does not take the CPU from the restore
    /// (on one machine, or the store's).
    pub held: bool,
}

impl LateOptions {
    pub fn bound(store_bound: Duration) -> LateOptions {
        LateOptions {
            store_bound,
            background_rate: 0,
            held: false,
        }
    }
}

/// Writes a frozen process's late pages to late.img on a thread of its own.
pub struct Flusher {
    stop: Arc<AtomicBool>,
    /// Whether chunks nobody asked for may be written (see [`LateOptions::held`]).
    background: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<FlushEnd>>,
}

impl Flusher {
    /// Starts writing the late pages of `pid` (frozen; it must stay so until the
    /// flush ends).
    pub fn start(pid: i32, images: &Path, runs: Vec<LateRun>, opts: LateOptions) -> Flusher {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let background = Arc::new(AtomicBool::new(!opts.held));
        let free = background.clone();
        let images = images.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("late-flush".into())
            .spawn(move || {
                let _span = tracing::info_span!("late_flush", pid).entered();
                let end = Flush::new(pid, images, runs, opts, flag, free).run();
                match &end {
                    FlushEnd::Done { bytes, ms } => {
                        tracing::info!(bytes, ms, "late pages written")
                    }
                    FlushEnd::NotNeeded { bytes, why } => {
                        tracing::info!(bytes, why, "late flush ended early")
                    }
                    FlushEnd::Stopped => tracing::info!("late flush stopped"),
                    FlushEnd::Failed(e) => tracing::error!(error = %e, "late flush failed"),
                }
                end
            })
            .expect("spawning the late-flush thread");
        Flusher {
            stop,
            background,
            thread: Some(thread),
        }
    }

    /// Lets the flush write the chunks nobody asked for (see [`LateOptions::held`]).
    pub fn release(&self) {
        self.background.store(true, Ordering::SeqCst);
    }

    /// Waits for the flush to end.
    pub fn wait(mut self) -> FlushEnd {
        self.join()
    }

    /// Stops the flush (the migration was abandoned) and waits for the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.join();
    }

    fn join(&mut self) -> FlushEnd {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(end)) => end,
            Some(Err(_)) => FlushEnd::Failed("the late-flush thread panicked".into()),
            None => FlushEnd::Stopped,
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.join();
    }
}

struct Flush {
    pid: i32,
    images: PathBuf,
    runs: Vec<LateRun>,
    len: u64,
    opts: LateOptions,
    stop: Arc<AtomicBool>,
    background: Arc<AtomicBool>,
    mem: Option<File>,
    /// Whether late.img and late.ready are written with O_DIRECT (see
    /// [`sys::on_fuse`]); the 8-byte records then also need no read of the page
    /// they land in.
    direct: bool,
    /// late.img, open for writing between writes (see
    /// [`with_file_kept`](Self::with_file_kept)).
    img: Option<File>,
    /// late.ready, likewise.
    ready: Option<File>,
    want_off: u64,
    wants: VecDeque<u64>,
    ready_records: u64,
}

enum Step {
    Go,
    End(FlushEnd),
}

/// The flusher's next move.
enum Pick {
    /// Write `n` chunks from `first` (`wanted`: the destination waits for it).
    Chunks { first: u64, n: u64, wanted: bool },
    /// Nothing wanted, and the background rate says wait this long.
    Wait(Duration),
    /// Every chunk is written.
    Finished,
}

impl Flush {
    fn new(
        pid: i32,
        images: PathBuf,
        runs: Vec<LateRun>,
        opts: LateOptions,
        stop: Arc<AtomicBool>,
        background: Arc<AtomicBool>,
    ) -> Flush {
        let len = runs.last().map_or(0, |r| r.off + r.len);
        let direct = sys::on_fuse(&images);
        Flush {
            pid,
            images,
            runs,
            len,
            opts,
            stop,
            background,
            mem: File::open(format!("/proc/{pid}/mem")).ok(),
            direct,
            img: None,
            ready: None,
            want_off: 0,
            wants: VecDeque::new(),
            ready_records: 0,
        }
    }

    /// Opens file `name` of the image (`write`: for writing) and runs `op` on it,
    /// retrying with backoff while the store fails, up to the bound; ends the flush
    /// if the image was removed. Every use opens and closes the file: a close pushes
    /// our writes through the node's caches to fs-server, and an open sees the other
    /// side's (close-to-open), so nothing waits in a cache.
    fn with_file<T>(
        &mut self,
        name: &str,
        write: bool,
        op: impl FnMut(&File) -> std::io::Result<T>,
    ) -> Result<T, FlushEnd> {
        self.with_file_kept(name, write, None, op)
    }

    /// [`with_file`](Self::with_file), keeping the file open in `kept` between uses
    /// (late.img and late.ready, written the whole flush: an open and a close per
    /// write cost two round trips to fs-server, and each open by one side while the
    /// other holds the file open makes fs-server call the holder back). A flush of
    /// the handle ([`sys::flush_checked`]) stands for the close: the writes are at
    /// fs-server when `op` is done. A handle that failed is dropped and the next
    /// try opens the file afresh.
    fn with_file_kept<T>(
        &mut self,
        name: &str,
        write: bool,
        mut kept: Option<&mut Option<File>>,
        mut op: impl FnMut(&File) -> std::io::Result<T>,
    ) -> Result<T, FlushEnd> {
        let path = self.images.join(name);
        let what = format!("{} {name}", if write { "writing" } else { "reading" });
        let mut since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(FlushEnd::Stopped);
            }
            let held = kept.as_mut().and_then(|k| k.take());
            let opened = match (held, write) {
                (Some(f), _) => Ok(f),
                (None, true) => sys::open_write(&path, self.direct),
                (None, false) => File::open(&path),
            };
            let r = match opened {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(FlushEnd::NotNeeded {
                        bytes: 0,
                        why: format!("{} was removed", path.display()),
                    })
                }
                Err(e) => Err(e),
                // The close's (or flush's) answer counts: a write fuse-client queued
                // and could not deliver (fs-server went away meanwhile) is reported
                // there.
                Ok(f) => match kept.as_mut() {
                    None => op(&f).and_then(|v| sys::close_checked(f).map(|()| v)),
                    Some(k) => {
                        let r = op(&f).and_then(|v| sys::flush_checked(&f).map(|()| v));
                        if r.is_ok() {
                            **k = Some(f);
                        }
                        r
                    }
                },
            };
            match r {
                Ok(v) => {
                    if let Some(s) = since {
                        tracing::info!(
                            secs = s.elapsed().as_secs_f64(),
                            "the store takes late pages again"
                        );
                    }
                    return Ok(v);
                }
                Err(e) => {
                    if let Some(end) = self.failing(&mut since, &mut backoff, &what, e) {
                        return Err(end);
                    }
                }
            }
        }
    }

    fn failing(
        &self,
        since: &mut Option<Instant>,
        backoff: &mut Duration,
        what: &str,
        e: std::io::Error,
    ) -> Option<FlushEnd> {
        let t = *since.get_or_insert_with(|| {
            tracing::warn!(error = %e, what, "the store refuses late pages; retrying");
            Instant::now()
        });
        if t.elapsed() > self.opts.store_bound {
            return Some(FlushEnd::Failed(format!(
                "{what} in {}: {e} for {:.1} s (bound {} s)",
                self.images.display(),
                t.elapsed().as_secs_f64(),
                self.opts.store_bound.as_secs()
            )));
        }
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(Duration::from_secs(1));
        None
    }

    /// Reads the wants appended since the last look.
    fn read_wants(&mut self, chunks: u64) -> Step {
        let at = self.want_off;
        // A handle opened for this look, seeing what the destination wrote (see
        // `LateReader::poll` on handles kept open).
        let got = self.with_file(image::LATE_WANT_FILE, false, |f| {
            let mut buf = vec![0u8; 4096];
            fresh_view(f, at);
            let n = f.read_at(&mut buf, at)?;
            buf.truncate(n / 4 * 4);
            Ok(buf)
        });
        let buf = match got {
            Ok(b) => b,
            Err(end) => return Step::End(end),
        };
        for rec in buf.chunks_exact(4) {
            let v = u32::from_le_bytes(rec.try_into().unwrap());
            if v == 0 {
                break; // not written yet (a hole): read again from here next time
            }
            self.want_off += 4;
            if v == image::LATE_DONE {
                return Step::End(FlushEnd::NotNeeded {
                    bytes: 0,
                    why: "the destination has every page".into(),
                });
            }
            let c = (v - 1) as u64;
            if c < chunks {
                self.wants.push_back(c);
            }
        }
        Step::Go
    }

    /// Gathers chunks `c0..c0 + n` of late.img from the process's memory into `buf`
    /// (runs cover late.img without gaps: every byte of `buf` is read; its length
    /// changes only for a short last batch, so that it is not zeroed each time).
    fn gather(&mut self, c0: u64, n: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        let lo = c0 * CHUNK;
        let hi = (lo + n * CHUNK).min(self.len);
        buf.resize((hi - lo) as usize, 0);
        let mut i = self.runs.partition_point(|r| r.off + r.len <= lo);
        while i < self.runs.len() && self.runs[i].off < hi {
            let r = self.runs[i];
            let a = r.off.max(lo);
            let b = (r.off + r.len).min(hi);
            let slot = &mut buf[(a - lo) as usize..(b - lo) as usize];
            let addr = r.addr + (a - r.off);
            if !read_frozen(self.pid, self.mem.as_ref(), addr, slot) {
                return Err(format!(
                    "pid {}: cannot read {} bytes at {addr:#x} of the frozen process",
                    self.pid,
                    slot.len()
                ));
            }
            i += 1;
        }
        Ok(())
    }

    /// How long to hold back chunks nobody waits for (the background rate cap).
    fn rate_pause(&self, t0: Instant, background: u64) -> Option<Duration> {
        let rate = self.opts.background_rate;
        if rate == 0 {
            return None;
        }
        let due = t0 + Duration::from_secs_f64(background as f64 / rate as f64);
        due.checked_duration_since(Instant::now())
    }

    /// What to write next: a wanted chunk alone; else the next ones in order, a
    /// batch at a time (fewer, larger writes while nobody waits), unless the
    /// background rate holds them back.
    fn pick(&mut self, done: &[bool], next: &mut u64, t0: Instant, background: u64) -> Pick {
        while let Some(c) = self.wants.pop_front() {
            if !done[c as usize] {
                return Pick::Chunks {
                    first: c,
                    n: 1,
                    wanted: true,
                };
            }
        }
        let chunks = done.len() as u64;
        while *next < chunks && done[*next as usize] {
            *next += 1;
        }
        if *next == chunks {
            return Pick::Finished;
        }
        if !self.background.load(Ordering::SeqCst) {
            return Pick::Wait(Duration::from_millis(2));
        }
        if let Some(pause) = self.rate_pause(t0, background) {
            return Pick::Wait(pause);
        }
        let mut n = 1;
        while n < BATCH && *next + n < chunks && !done[(*next + n) as usize] {
            n += 1;
        }
        Pick::Chunks {
            first: *next,
            n,
            wanted: false,
        }
    }

    /// Writes `data` at `at` in file `name` of the image, kept open in the field
    /// `slot` gives (see [`with_file_kept`](Self::with_file_kept)).
    fn write_kept(
        &mut self,
        name: &str,
        slot: fn(&mut Flush) -> &mut Option<File>,
        data: &[u8],
        at: u64,
    ) -> Result<(), FlushEnd> {
        let mut kept = slot(self).take();
        let written =
            self.with_file_kept(name, true, Some(&mut kept), |f| f.write_all_at(data, at));
        *slot(self) = kept;
        written
    }

    /// Writes chunks `c0..c0 + n` (gathered in `buf`) and lists them in late.ready.
    fn put(&mut self, c0: u64, n: u64, buf: &[u8], st: &mut FlushStats) -> Result<(), FlushEnd> {
        let t = Instant::now();
        self.write_kept(image::LATE_FILE, |fl| &mut fl.img, buf, c0 * CHUNK)?;
        st.put_img += t.elapsed();
        let mut recs = Vec::with_capacity(8 * n as usize);
        for (k, piece) in buf.chunks(CHUNK as usize).enumerate() {
            recs.extend_from_slice(&(c0 as u32 + k as u32 + 1).to_le_bytes());
            recs.extend_from_slice(&crc32c::crc32c(piece).to_le_bytes());
        }
        let at = self.ready_records * 8;
        self.write_kept(image::LATE_READY_FILE, |fl| &mut fl.ready, &recs, at)?;
        self.ready_records += n;
        Ok(())
    }

    fn run(mut self) -> FlushEnd {
        let mut st = FlushStats::default();
        let end = match self.flush(&mut st) {
            // Counted here: the step that found the flush not needed does not know
            // what was written before it.
            FlushEnd::NotNeeded { why, .. } => FlushEnd::NotNeeded {
                bytes: st.bytes,
                why,
            },
            end => end,
        };
        st.log();
        end
    }

    /// The flush: `st` counts what was written and where the time went.
    fn flush(&mut self, st: &mut FlushStats) -> FlushEnd {
        let t0 = Instant::now();
        let chunks = self.len.div_ceil(CHUNK);
        let mut done = vec![false; chunks as usize];
        let mut next = 0u64;
        let mut background = 0u64;
        let mut buf = Vec::with_capacity((BATCH * CHUNK) as usize);
        let mut checks = 0;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return FlushEnd::Stopped;
            }
            let t = Instant::now();
            let wants = self.read_wants(chunks);
            st.wants += t.elapsed();
            if let Step::End(end) = wants {
                return end;
            }
            let (c0, n, wanted) = match self.pick(&done, &mut next, t0, background) {
                Pick::Chunks { first, n, wanted } => (first, n, wanted),
                Pick::Wait(pause) => {
                    let t = Instant::now();
                    std::thread::sleep(pause.min(Duration::from_millis(2)));
                    st.waited += t.elapsed();
                    continue;
                }
                Pick::Finished => {
                    let unlisted = match self.unlisted(chunks) {
                        Ok(u) => u,
                        Err(end) => return end,
                    };
                    if unlisted.is_empty() {
                        break;
                    }
                    checks += 1;
                    if checks > 3 {
                        return FlushEnd::Failed(format!(
                            "late.ready in {} still lacks {} chunks after writing them {checks} times",
                            self.images.display(),
                            unlisted.len()
                        ));
                    }
                    tracing::warn!(
                        chunks = unlisted.len(),
                        "late.ready lacks chunks written before (a write lost with fs-server?); writing them again"
                    );
                    for c in unlisted {
                        done[c as usize] = false;
                    }
                    next = 0;
                    continue;
                }
            };
            let t = Instant::now();
            if let Err(e) = self.gather(c0, n, &mut buf) {
                return FlushEnd::Failed(e);
            }
            let t1 = Instant::now();
            st.gather += t1 - t;
            if let Err(end) = self.put(c0, n, &buf, st) {
                return end;
            }
            st.put += t1.elapsed();
            for c in c0..c0 + n {
                done[c as usize] = true;
            }
            if wanted {
                st.wanted_writes += 1;
            } else {
                st.batch_writes += 1;
                background += buf.len() as u64;
            }
            st.bytes += buf.len() as u64;
        }
        let t = Instant::now();
        // Their writes were flushed one by one; the syncs below open afresh.
        drop((self.img.take(), self.ready.take()));
        for name in [image::LATE_FILE, image::LATE_READY_FILE] {
            if let Err(end) = self.with_file(name, true, |f| f.sync_all()) {
                return end;
            }
        }
        st.sync += t.elapsed();
        FlushEnd::Done {
            bytes: st.bytes,
            ms: t0.elapsed().as_secs_f64() * 1e3,
        }
    }

    /// The chunks late.ready does not list, as fs-server has it now: a check after
    /// the last write that none went missing (a destination waiting for a chunk the
    /// source believes written would wait until its store bound).
    fn unlisted(&mut self, chunks: u64) -> Result<Vec<u64>, FlushEnd> {
        let data = self.with_file(image::LATE_READY_FILE, false, |f| {
            fresh_view(f, 0);
            let mut data = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = f.read_at(&mut buf, data.len() as u64)?;
                if n == 0 {
                    return Ok(data);
                }
                data.extend_from_slice(&buf[..n]);
            }
        })?;
        let mut listed = vec![false; chunks as usize];
        for rec in data.chunks_exact(8) {
            let c1 = u32::from_le_bytes(rec[..4].try_into().unwrap()) as usize;
            if c1 == 0 {
                break;
            }
            if let Some(l) = listed.get_mut(c1 - 1) {
                *l = true;
            }
        }
        Ok((0..chunks).filter(|&c| !listed[c as usize]).collect())
    }
}

/// What a flush wrote and where its time went (a debug line at its end).
#[derive(Default)]
struct FlushStats {
    bytes: u64,
    /// Writes of chunks the destination waited for / of batches nobody asked for.
    wanted_writes: u64,
    batch_writes: u64,
    /// Reading late.want, gathering pages, writing (late.img and late.ready),
    /// waiting (held back), syncing at the end.
    wants: Duration,
    gather: Duration,
    put: Duration,
    /// Of `put`: late.img's write and flush.
    put_img: Duration,
    waited: Duration,
    sync: Duration,
}

impl FlushStats {
    fn log(&self) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            bytes = self.bytes,
            wanted_writes = self.wanted_writes,
            batch_writes = self.batch_writes,
            wants_ms = ms(self.wants),
            gather_ms = ms(self.gather),
            put_ms = ms(self.put),
            put_img_ms = ms(self.put_img),
            waited_ms = ms(self.waited),
            sync_ms = ms(self.sync),
            "late flush: where the time went"
        );
    }
}

/// Chunks written together while no chunk is wanted (a wanted chunk waits behind
/// at most one batch). Measured at 1 GiB, all pages late, the destination reading
/// meanwhile: 4 chunks a write 7.2 s, 8 6.2 s, 16 5.3 s; the write path through
/// "/..." is the bound, not the round trips.
const BATCH: u64 = 8;

/// Reads `slot.len()` bytes at `addr` of the frozen process `pid`:
/// process_vm_readv, else `mem` (its /proc/PID/mem, which also reads what
/// process_vm_readv refuses, e.g. PROT_NONE pages). Whether it read them all.
pub(crate) fn read_frozen(pid: i32, mem: Option<&File>, addr: u64, slot: &mut [u8]) -> bool {
    sys::vm_read_exact(pid, addr, slot).is_ok()
        || mem.is_some_and(|m| m.read_exact_at(slot, addr).is_ok())
}

/// Makes the next read of `f` from `off` on see what the other node wrote: drops
/// this node's cached pages from there (one cached while the file was shorter holds
/// zeros where later records are) and asks for the size afresh (the kernel's may be
/// behind). Both are cheap next to the read; failures only mean an older view.
pub fn fresh_view(f: &File, off: u64) {
    let _ = sys::drop_cached(f, off & !(sys::page_size() - 1), 0);
    let _ = sys::refresh_size(f.as_raw_fd());
}

/// How long [`LateReader::wait_ready`] waits before giving the caller back control.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// The destination's view of late.img: which chunks are written (and their CRCs),
/// and the wants it sends.
pub struct LateReader {
    dir: PathBuf,
    crcs: Vec<Option<u32>>,
    missing: u64,
    /// late.ready as the last `poll` opened it.
    ready: Option<File>,
    ready_off: u64,
    /// Where our next want record goes (known after the first).
    want_off: Option<u64>,
    wanted: HashSet<u64>,
    /// Whether late.want is written with O_DIRECT (see [`sys::on_fuse`]).
    direct: bool,
    /// Looks at late.ready and records appended to late.want (a debug line at
    /// [`done`](Self::done)).
    polls: u64,
    wants_sent: u64,
}

impl LateReader {
    pub fn new(dir: &Path, len: u64) -> LateReader {
        let chunks = len.div_ceil(CHUNK);
        LateReader {
            dir: dir.to_path_buf(),
            crcs: vec![None; chunks as usize],
            missing: chunks,
            ready: None,
            ready_off: 0,
            want_off: None,
            wanted: HashSet::new(),
            direct: sys::on_fuse(dir),
            polls: 0,
            wants_sent: 0,
        }
    }

    /// The CRC-32C of chunk `c` once it is written.
    pub fn crc(&self, c: u64) -> Option<u32> {
        self.crcs.get(c as usize).copied().flatten()
    }

    /// Reads the readiness records appended since the last look, through a handle
    /// opened by path for this look (see [`fresh_view`]). A handle kept open was
    /// seen to stop following the file after the destination's migd restarted (its
    /// size stayed put while a new open saw it grow); a fresh one never did.
    pub fn poll(&mut self) -> Result<(), String> {
        if self.missing == 0 {
            return Ok(());
        }
        let p = self.dir.join(image::LATE_READY_FILE);
        self.polls += 1;
        self.ready = Some(File::open(&p).map_err(|e| format!("open {}: {e}", p.display()))?);
        let f = self.ready.as_ref().unwrap();
        fresh_view(f, self.ready_off);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match f.read_at(&mut buf, self.ready_off) {
                Ok(n) => n,
                Err(e) => {
                    self.ready = None;
                    return Err(format!("reading {}: {e}", p.display()));
                }
            };
            let mut took = 0;
            for rec in buf[..n / 8 * 8].chunks_exact(8) {
                let c1 = u32::from_le_bytes(rec[..4].try_into().unwrap()) as u64;
                if c1 == 0 {
                    break; // not written yet (a hole): read again from here next time
                }
                let crc = u32::from_le_bytes(rec[4..].try_into().unwrap());
                if let Some(slot) = self.crcs.get_mut((c1 - 1) as usize) {
                    if slot.is_none() {
                        self.missing -= 1;
                    }
                    *slot = Some(crc);
                }
                took += 8;
            }
            self.ready_off += took as u64;
            if took < buf.len() {
                break;
            }
        }
        Ok(())
    }

    /// Appends one record to late.want (opened for it and closed again, so that it
    /// reaches fs-server at once). A resumed server appends after its predecessor's
    /// records (the file's size when it first writes).
    fn append_want(&mut self, rec: u32) -> Result<(), String> {
        let p = self.dir.join(image::LATE_WANT_FILE);
        let f =
            sys::open_write(&p, self.direct).map_err(|e| format!("open {}: {e}", p.display()))?;
        let at = match self.want_off {
            Some(at) => at,
            None => f.metadata().map(|m| m.len() / 4 * 4).unwrap_or(0),
        };
        f.write_all_at(&rec.to_le_bytes(), at)
            .and_then(|()| sys::close_checked(f))
            .map_err(|e| format!("writing {}: {e}", p.display()))?;
        self.want_off = Some(at + 4);
        self.wants_sent += 1;
        Ok(())
    }

    /// Asks the source for chunk `c` first (once).
    pub fn want(&mut self, c: u64) -> Result<(), String> {
        if self.crc(c).is_some() || self.wanted.contains(&c) {
            return Ok(());
        }
        self.append_want(c as u32 + 1)?;
        self.wanted.insert(c);
        Ok(())
    }

    /// Waits (a slice of time at most) for chunk `c`, asking for it first. Errors:
    /// (why, `true` if the chunk is just not written yet).
    pub fn wait_ready(&mut self, c: u64) -> Result<u32, (String, bool)> {
        let t0 = Instant::now();
        self.poll().map_err(|e| (e, false))?;
        if let Some(crc) = self.crc(c) {
            return Ok(crc);
        }
        self.want(c).map_err(|e| (e, false))?;
        loop {
            std::thread::sleep(Duration::from_micros(500));
            self.poll().map_err(|e| (e, false))?;
            if let Some(crc) = self.crc(c) {
                return Ok(crc);
            }
            if t0.elapsed() > WAIT_SLICE {
                let size = self
                    .ready
                    .as_ref()
                    .and_then(|f| sys::refresh_size(f.as_raw_fd()).ok());
                return Err((
                    format!(
                        "chunk {c} of late.img not written by the source yet (late.ready: \
                         {} records read, {} chunks not listed, size {size:?})",
                        self.ready_off / 8,
                        self.missing
                    ),
                    true,
                ));
            }
        }
    }

    /// Tells the source that nothing more is needed (best effort: the source also
    /// stops when the image is removed).
    pub fn done(&mut self) {
        if self.polls > 0 {
            tracing::debug!(
                polls = self.polls,
                wants = self.wants_sent,
                "late.ready looks and late.want records"
            );
            self.polls = 0;
        }
        if self.missing > 0 {
            if let Err(e) = self.append_want(image::LATE_DONE) {
                tracing::debug!(error = %e, "could not tell the source the late pages are in");
            }
        }
        self.missing = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_windows_in_the_image_and_defers_the_rest() {
        let d = Deferral {
            windows: vec![(0x3000, 0x5000), (0x8000, 0x9000)],
            ..Deferral::default()
        };
        assert_eq!(
            d.split(0x1000, 0xa000),
            vec![
                (0x1000, 0x3000, true),
                (0x3000, 0x5000, false),
                (0x5000, 0x8000, true),
                (0x8000, 0x9000, false),
                (0x9000, 0xa000, true),
            ]
        );
        assert_eq!(d.split(0x4000, 0x4800), vec![(0x4000, 0x4800, false)]);
        assert_eq!(d.split(0x6000, 0x7000), vec![(0x6000, 0x7000, true)]);
    }

    #[test]
    fn deferred_runs_are_contiguous_in_late_img_and_join() {
        let mut d = Deferral::default();
        assert_eq!(d.defer(0x1000, 0x3000), LATE);
        assert_eq!(d.defer(0x3000, 0x4000), LATE | 0x2000);
        assert_eq!(d.defer(0x8000, 0x9000), LATE | 0x3000);
        assert_eq!(d.len(), 0x4000);
        assert_eq!(
            d.into_runs(),
            vec![
                LateRun {
                    addr: 0x1000,
                    len: 0x3000,
                    off: 0
                },
                LateRun {
                    addr: 0x8000,
                    len: 0x1000,
                    off: 0x3000
                }
            ]
        );
    }
}
