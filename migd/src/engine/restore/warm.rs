//! Pages read while pre-copy runs ("warm" pages): a migration's destination reads
//! pages.img's finished rounds from the store into its own memory while the source
//! writes the next ones, so that after the freeze the pager copies most pages from
//! memory instead of waiting for the store (docs/lazy.md, "Warm pages").
//!
//! The source appends records to pages.ready while the rounds go on
//! (`image::note_pages_ready`): how much of pages.img is on the store's server, and
//! which older copies were replaced; pages.img is only appended to, so the bytes
//! below a record never change. [`PageWarmer`] follows those records on a thread of
//! its own and reads each whole chunk once, skipping the replaced ones;
//! [`PageWarmer::finish`] stops it (at most one 1 MiB read later) and gives the
//! [`WarmPages`] read so far.
//! Nothing here is trusted: the pager checks each chunk it takes from them against
//! the manifest's CRC-32C and reads a chunk that does not match from the store.

use crate::engine::image::{self, CHUNK};
use crate::engine::late::fresh_view;
use crate::sys;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// How often the warmer looks at pages.ready when it has nothing to read.
const POLL: Duration = Duration::from_millis(20);

/// Chunks of pages.img read before the restore.
pub struct WarmPages {
    /// pages.img's first bytes' place (chunk `i` at `i * CHUNK`); only the chunks
    /// read take memory.
    map: sys::AnonMap,
    /// Which chunks were read, whole.
    have: Vec<bool>,
    /// Bytes read.
    bytes: u64,
}

impl std::fmt::Debug for WarmPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WarmPages({} bytes)", self.bytes)
    }
}

impl WarmPages {
    /// Bytes read.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Forgets chunk `i` and gives its memory back (see `AnonMap::discard`).
    pub fn drop_chunk(&mut self, i: u64) {
        if !self.has(i) {
            return;
        }
        self.have[i as usize] = false;
        self.bytes -= CHUNK;
        if let Err(e) = self.map.discard((i * CHUNK) as usize, CHUNK as usize) {
            tracing::debug!(chunk = i, "MADV_DONTNEED of a warm chunk: {e}");
        }
    }

    /// Whether chunk `i` was read.
    pub fn has(&self, i: u64) -> bool {
        self.have.get(i as usize).copied().unwrap_or(false)
    }

    /// Chunk `i`, if it was read.
    pub fn chunk(&self, i: u64) -> Option<&[u8]> {
        self.slice(i * CHUNK, CHUNK)
    }

    /// `len` bytes at `off`, if every chunk they touch was read.
    pub fn slice(&self, off: u64, len: u64) -> Option<&[u8]> {
        let (c0, c1) = (off / CHUNK, (off + len).max(1).div_ceil(CHUNK));
        (c0..c1)
            .all(|c| self.has(c))
            .then(|| &self.map.bytes()[off as usize..(off + len) as usize])
    }
}

/// Warm pages handed to a restore ([`super::RestoreOptions::warm`]): taken once, by
/// the pager that serves them (it frees each chunk once it is copied).
#[derive(Clone, Default)]
pub struct Handed(Arc<std::sync::Mutex<Option<WarmPages>>>);

impl Handed {
    pub fn new(w: WarmPages) -> Handed {
        Handed(Arc::new(std::sync::Mutex::new(Some(w))))
    }

    pub fn take(&self) -> Option<WarmPages> {
        self.0.lock().ok()?.take()
    }
}

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.lock().as_deref() {
            Ok(Some(w)) => w.fmt(f),
            _ => f.write_str("no warm pages"),
        }
    }
}

/// Reads pages.img's finished rounds while pre-copy goes on (see the module's text).
pub struct PageWarmer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<WarmPages>>,
    /// Bytes read so far.
    read: Arc<AtomicU64>,
}

impl PageWarmer {
    /// Starts following `images` (pages.ready, pages.img), reading at most `cap`
    /// bytes (memory is taken only as chunks are read).
    pub fn start(images: PathBuf, cap: u64) -> Result<PageWarmer, String> {
        let map = warm_map(cap)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let read = Arc::new(AtomicU64::new(0));
        let mut w = Warmer::new(images, map, read.clone());
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("page-warmer".into())
            .spawn(move || {
                let _span = span.entered();
                // Nobody waits for it: the restore in the freeze goes first.
                if let Err(e) = sys::background_thread() {
                    tracing::debug!("cannot lower the page warmer's priority: {e}");
                }
                w.run(&stopped);
                w.warm
            })
            .map_err(|e| format!("starting the page warmer: {e}"))?;
        Ok(PageWarmer {
            stop: Some(stop),
            thread: Some(thread),
            read,
        })
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Stops reading (after the read under way, at most one chunk) and returns
    /// what was read; `None` if the thread died.
    pub fn finish(mut self) -> Option<WarmPages> {
        drop(self.stop.take());
        let warm = self.thread.take()?.join().ok()?;
        tracing::debug!(bytes = warm.bytes, "pages read during pre-copy");
        Some(warm)
    }
}

impl Drop for PageWarmer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The memory for `cap` bytes (whole chunks) of warm pages.
fn warm_map(cap: u64) -> Result<sys::AnonMap, String> {
    let cap = cap - cap % CHUNK;
    let map = sys::AnonMap::new(cap as usize)
        .map_err(|e| format!("mapping {cap} bytes for pages read during pre-copy: {e}"))?;
    // The restore forks the process's stub after this; it must not copy these
    // page tables.
    map.keep_from_children()
        .map_err(|e| format!("MADV_DONTFORK on the warm pages: {e}"))?;
    Ok(map)
}

/// Reads pages.img's whole chunks in its first `cap` bytes now, as a destination
/// reads them during pre-copy (`migd restore --lazy --warm-mib`: tests and
/// measurements of the pager with warm pages).
pub fn read_now(images: &std::path::Path, cap: u64) -> Result<WarmPages, String> {
    let path = images.join(image::PAGES_FILE);
    let len = std::fs::metadata(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut w = Warmer::new(images.to_path_buf(), warm_map(cap)?, Default::default());
    w.listed = len;
    while let Some(c) = w.next_chunk() {
        w.read_chunk(c)?;
    }
    Ok(w.warm)
}

/// Ranges of pages.img holding copies that a later round replaced, joined.
#[derive(Default)]
struct Superseded(std::collections::BTreeMap<u64, u64>);

impl Superseded {
    fn add(&mut self, mut lo: u64, mut hi: u64) {
        if lo >= hi {
            return;
        }
        if let Some((&s, &e)) = self.0.range(..=lo).next_back() {
            if e >= lo {
                lo = s;
                hi = hi.max(e);
            }
        }
        let inside: Vec<u64> = self.0.range(lo..=hi).map(|(&s, _)| s).collect();
        for s in inside {
            hi = hi.max(self.0.remove(&s).unwrap());
        }
        self.0.insert(lo, hi);
    }

    /// Whether all of `[lo, hi)` was replaced.
    fn covers(&self, lo: u64, hi: u64) -> bool {
        self.0
            .range(..=lo)
            .next_back()
            .is_some_and(|(_, &e)| e >= hi)
    }
}

struct Warmer {
    dir: PathBuf,
    /// pages.img, opened once there is something to read.
    pages: Option<File>,
    /// How far pages.ready was read.
    ready_off: u64,
    /// The longest finished length pages.ready lists.
    listed: u64,
    superseded: Superseded,
    /// The next chunk to read.
    next: u64,
    warm: WarmPages,
    /// `warm.bytes`, for [`PageWarmer::bytes`].
    shown: Arc<AtomicU64>,
}

impl Warmer {
    fn new(dir: PathBuf, map: sys::AnonMap, shown: Arc<AtomicU64>) -> Warmer {
        Warmer {
            dir,
            pages: None,
            ready_off: 0,
            listed: 0,
            superseded: Superseded::default(),
            next: 0,
            warm: WarmPages {
                have: vec![false; map.bytes().len() / CHUNK as usize],
                map,
                bytes: 0,
            },
            shown,
        }
    }

    /// Reads what pages.ready lists until told to stop (`stopped` disconnected).
    fn run(&mut self, stopped: &mpsc::Receiver<()>) {
        // Waits `wait` (none: only looks); whether to stop.
        let told = |wait: Duration| match stopped.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => false,
        };
        loop {
            let Some(c) = self.next_chunk() else {
                if told(POLL) {
                    return;
                }
                if let Err(e) = self.poll() {
                    tracing::trace!("pages.ready: {e}");
                }
                continue;
            };
            if told(Duration::ZERO) {
                return;
            }
            if let Err(e) = self.read_chunk(c) {
                // Read again at the next poll (the store may be restarting); the
                // pager reads whatever is missing from the store itself.
                tracing::debug!("reading pages.img during pre-copy: {e}");
                self.pages = None;
                if told(POLL) {
                    return;
                }
            }
        }
    }

    /// The next chunk to read: whole below the listed length, within the cap, not
    /// all replaced by later rounds.
    fn next_chunk(&mut self) -> Option<u64> {
        let cap = self.warm.have.len() as u64;
        while self.next < cap && (self.next + 1) * CHUNK <= self.listed {
            let c = self.next;
            if !self.superseded.covers(c * CHUNK, (c + 1) * CHUNK) {
                return Some(c);
            }
            self.next += 1;
        }
        None
    }

    /// Reads the records pages.ready holds past what was read of it (a record
    /// not whole yet is read again at the next poll).
    fn poll(&mut self) -> Result<(), String> {
        let p = self.dir.join(image::PAGES_READY_FILE);
        let mut f = File::open(&p).map_err(|e| format!("open {}: {e}", p.display()))?;
        fresh_view(&f, self.ready_off);
        let mut buf = Vec::new();
        f.seek(std::io::SeekFrom::Start(self.ready_off))
            .and_then(|_| f.read_to_end(&mut buf))
            .map_err(|e| format!("read {}: {e}", p.display()))?;
        let mut at = 0;
        while let Some(rec) = image::parse_pages_ready(&buf[at..]) {
            self.listed = self.listed.max(rec.len);
            for (lo, hi) in rec.replaced {
                self.superseded.add(lo, hi);
                // Chunks read already whose copies are all replaced now: their
                // memory serves the next reads.
                for c in lo.div_ceil(CHUNK)..hi / CHUNK {
                    if self.superseded.covers(c * CHUNK, (c + 1) * CHUNK) {
                        self.warm.drop_chunk(c);
                    }
                }
            }
            at += rec.size;
        }
        self.shown.store(self.warm.bytes, Ordering::Relaxed);
        self.ready_off += at as u64;
        Ok(())
    }

    /// Reads chunk `c` of pages.img.
    fn read_chunk(&mut self, c: u64) -> Result<(), String> {
        let path = self.dir.join(image::PAGES_FILE);
        if self.pages.is_none() {
            let f = sys::open_read(&path, sys::on_fuse(&path))
                .map_err(|e| format!("open {}: {e}", path.display()))?;
            // A new record may lie beyond the size this node knows.
            fresh_view(&f, c * CHUNK);
            self.pages = Some(f);
        }
        let f = self.pages.as_ref().unwrap();
        let (lo, hi) = (c * CHUNK, (c + 1) * CHUNK);
        let buf = &mut self.warm.map.bytes_mut()[lo as usize..hi as usize];
        if let Err(e) = f.read_exact_at(buf, lo) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // This node's size of it may be old: ask again before the retry.
                fresh_view(f, lo);
            }
            return Err(format!("read chunk {c} of {}: {e}", path.display()));
        }
        self.warm.have[c as usize] = true;
        self.warm.bytes += CHUNK;
        self.next = c + 1;
        self.shown.store(self.warm.bytes, Ordering::Relaxed);
        Ok(())
    }
}

/// Bytes of pages.img a destination reads during pre-copy at most: `wanted`, and
/// no more than a quarter of the memory this node has available now (the restored
/// process needs its own copy of them as well).
pub fn cap(wanted: u64) -> u64 {
    wanted.min(mem_available().unwrap_or(0) / 4)
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(mut f: impl FnMut() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(10), "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn data(len: u64) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn chunk_of(d: &[u8], i: u64) -> &[u8] {
        &d[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize]
    }

    #[test]
    fn the_warmer_reads_the_whole_chunks_pages_ready_lists_and_nothing_beyond() {
        let dir = tempfile::tempdir().unwrap();
        let pages = dir.path().join(image::PAGES_FILE);
        let d = data(3 * CHUNK + 12288);
        let w = PageWarmer::start(dir.path().to_path_buf(), 64 * CHUNK).unwrap();
        // Round 1: two chunks written, one and a half listed.
        std::fs::write(&pages, &d[..(2 * CHUNK) as usize]).unwrap();
        image::note_pages_ready(dir.path(), CHUNK + CHUNK / 2, Vec::new()).unwrap();
        wait_for(|| w.bytes() == CHUNK);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(w.bytes(), CHUNK, "read beyond what pages.ready lists");
        // Round 2 appends the rest: chunks 1 and 2 are whole now, 3 is not.
        std::fs::write(&pages, &d).unwrap();
        image::note_pages_ready(dir.path(), d.len() as u64, Vec::new()).unwrap();
        wait_for(|| w.bytes() == 3 * CHUNK);
        let warm = w.finish().expect("the warmer ran");
        for i in 0..3 {
            assert_eq!(warm.chunk(i), Some(chunk_of(&d, i)), "chunk {i}");
        }
        assert_eq!(warm.chunk(3), None);
        let off = CHUNK - 4096;
        assert_eq!(
            warm.slice(off, 8192),
            Some(&d[off as usize..off as usize + 8192])
        );
        assert_eq!(warm.slice(3 * CHUNK - 4096, 8192), None);
    }

    #[test]
    fn chunks_whose_copies_a_later_round_replaced_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(4 * CHUNK);
        std::fs::write(dir.path().join(image::PAGES_FILE), &d).unwrap();
        // Chunk 1 replaced in full, chunk 2 in part: 2 is still read.
        image::note_pages_ready(
            dir.path(),
            4 * CHUNK,
            vec![(CHUNK - 4096, 2 * CHUNK), (2 * CHUNK, 2 * CHUNK + 8192)],
        )
        .unwrap();
        let w = PageWarmer::start(dir.path().to_path_buf(), 64 * CHUNK).unwrap();
        wait_for(|| w.bytes() == 3 * CHUNK);
        std::thread::sleep(Duration::from_millis(100));
        let warm = w.finish().unwrap();
        assert_eq!(warm.bytes(), 3 * CHUNK);
        assert!(warm.has(0) && !warm.has(1) && warm.has(2) && warm.has(3));
        assert_eq!(warm.chunk(2), Some(chunk_of(&d, 2)));
    }

    #[test]
    fn a_listed_length_past_the_cap_is_read_up_to_the_cap_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = data(2 * CHUNK);
        std::fs::write(dir.path().join(image::PAGES_FILE), &d).unwrap();
        image::note_pages_ready(dir.path(), 2 * CHUNK, Vec::new()).unwrap();
        let w = PageWarmer::start(dir.path().to_path_buf(), CHUNK + 4096).unwrap();
        wait_for(|| w.bytes() == CHUNK);
        std::thread::sleep(Duration::from_millis(100));
        let warm = w.finish().unwrap();
        assert_eq!(warm.bytes(), CHUNK);
        assert_eq!(warm.chunk(0), Some(chunk_of(&d, 0)));
        assert_eq!(warm.chunk(1), None);
    }

    #[test]
    fn nothing_listed_nothing_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(image::PAGES_FILE), data(2 * CHUNK)).unwrap();
        let w = PageWarmer::start(dir.path().to_path_buf(), 4 * CHUNK).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(w.finish().unwrap().is_empty());
    }

    #[test]
    fn replaced_ranges_join_and_cover() {
        let mut s = Superseded::default();
        s.add(10, 20);
        s.add(30, 40);
        assert!(!s.covers(10, 40));
        s.add(20, 30);
        assert!(s.covers(10, 40));
        s.add(5, 12);
        assert!(s.covers(5, 40) && !s.covers(4, 40) && !s.covers(5, 41));
        assert_eq!(s.0.len(), 1);
    }
}
