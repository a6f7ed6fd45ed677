//! The image's pages as the pager reads them: whole chunks, each checked against its
//! CRC-32C, a few kept in memory; a failed read drops the file so that the next one
//! reopens it by path (a store whose server restarted answers on a new connection).
//!
//! Two page files: pages.img, written at the freeze (its CRCs in the manifest), and
//! late.img (offsets with [`image::LATE`]), written by the source after the freeze: a
//! late chunk is read once late.ready lists it, with its CRC, and asked for first in
//! late.want when a read needs it (see `engine::late`).

use crate::engine::image::{self, LATE};
use crate::engine::late::LateReader;
use crate::engine::restore::warm::WarmPages;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Chunks kept in memory (each [`image::CHUNK`] bytes).
const CACHE_CHUNKS: usize = 16;

/// Late chunks read at once at most (see [`Source::read_chunk`]).
const LATE_SPAN: u64 = 8;

/// Chunks of pages.img read ahead of a sequential reader (the prefetch).
const AHEAD_CHUNKS: u64 = 8;

/// Threads reading ahead (the store's client serves requests in parallel).
const AHEAD_THREADS: usize = 4;

/// Reads chunks of pages.img on a thread of its own, each checked against its CRC,
/// while the pager copies the ones before into the process: the store's latency
/// and the checksum overlap the copies. Asked only when reads go in order (the
/// prefetch); a fault elsewhere is read at once by the pager itself. A failed read
/// is only forgotten: the pager's own read then fails (or not) as it would have.
struct ReadAhead {
    ask: mpsc::Sender<u64>,
    got: mpsc::Receiver<(u64, Option<Vec<u8>>)>,
    /// Asked, not received yet.
    pending: BTreeSet<u64>,
    /// Received, not taken yet.
    ready: BTreeMap<u64, Vec<u8>>,
}

impl ReadAhead {
    fn start(path: PathBuf, len: u64, crcs: Vec<u32>) -> ReadAhead {
        let (ask, asked) = mpsc::channel::<u64>();
        let asked = std::sync::Arc::new(std::sync::Mutex::new(asked));
        let crcs = std::sync::Arc::new(crcs);
        let (give, got) = mpsc::channel();
        // O_DIRECT on `/...`: see `sys::on_fuse`.
        let direct = crate::sys::on_fuse(&path);
        for _ in 0..AHEAD_THREADS {
            let (asked, give, crcs, path) =
                (asked.clone(), give.clone(), crcs.clone(), path.clone());
            let span = tracing::Span::current();
            std::thread::spawn(move || {
                let _span = span.entered();
                let mut file: Option<std::fs::File> = None;
                // Ends when the pager's Source is dropped.
                loop {
                    let next = asked.lock().unwrap().recv();
                    let Ok(i) = next else { return };
                    let lo = i * image::CHUNK;
                    let mut buf = vec![0u8; (len - lo).min(image::CHUNK) as usize];
                    if file.is_none() {
                        file = crate::sys::open_read(&path, direct).ok();
                    }
                    let ok = match file.as_ref().map(|f| f.read_exact_at(&mut buf, lo)) {
                        None => Err("cannot open it".to_string()),
                        Some(Err(e)) => Err(e.to_string()),
                        Some(Ok(())) if crcs.get(i as usize) != Some(&crc32c::crc32c(&buf)) => {
                            Err("CRC mismatch".to_string())
                        }
                        Some(Ok(())) => Ok(()),
                    };
                    if let Err(e) = &ok {
                        tracing::debug!(chunk = i, direct, "read ahead of pages.img failed: {e}");
                        file = None;
                    }
                    let ok = ok.is_ok();
                    if give.send((i, ok.then_some(buf))).is_err() {
                        return;
                    }
                }
            });
        }
        ReadAhead {
            ask,
            got,
            pending: BTreeSet::new(),
            ready: BTreeMap::new(),
        }
    }

    fn keep(&mut self, (i, data): (u64, Option<Vec<u8>>)) {
        self.pending.remove(&i);
        if let Some(d) = data {
            self.ready.insert(i, d);
        }
    }

    /// Chunk `i` if it was read ahead (waiting for it if it is on its way).
    fn take(&mut self, i: u64) -> Option<Vec<u8>> {
        while let Ok(r) = self.got.try_recv() {
            self.keep(r);
        }
        while self.pending.contains(&i) {
            match self.got.recv() {
                Ok(r) => self.keep(r),
                Err(_) => {
                    self.pending.clear();
                    break;
                }
            }
        }
        self.ready.remove(&i)
    }

    /// Asks for the chunks after `i` (up to [`AHEAD_CHUNKS`], below `chunks`) not
    /// asked for yet; drops what was read ahead before `i` (the reader moved on).
    fn ask_after(&mut self, i: u64, chunks: u64, cached: impl Fn(u64) -> bool) {
        self.ready.retain(|&c, _| c > i);
        for c in i + 1..(i + 1 + AHEAD_CHUNKS).min(chunks) {
            if !self.pending.contains(&c) && !self.ready.contains_key(&c) && !cached(c) {
                if self.ask.send(c).is_err() {
                    return;
                }
                self.pending.insert(c);
            }
        }
    }
}

/// Applies `f(counter, bytes)` to the counter of each chunk `[off, off + len)`
/// touches, with the bytes it holds of it.
fn add_per_chunk(counts: &mut [u64], off: u64, len: u64, f: impl Fn(&mut u64, u64)) {
    let mut at = off;
    while at < off + len {
        let c = at / image::CHUNK;
        let end = ((c + 1) * image::CHUNK).min(off + len);
        if let Some(n) = counts.get_mut(c as usize) {
            f(n, end - at);
        }
        at = end;
    }
}

/// Why pages could not be read.
#[derive(Debug)]
pub(super) struct SourceError {
    pub(super) msg: String,
    /// A late chunk the source has not written yet (it was asked for), not a
    /// failing store.
    pub(super) not_yet: bool,
}

impl SourceError {
    fn store(msg: String) -> SourceError {
        SourceError {
            msg,
            not_yet: false,
        }
    }
}

/// One page file read in whole chunks.
pub(super) struct PageFile {
    pub(super) path: PathBuf,
    file: Option<std::fs::File>,
    pub(super) len: u64,
    /// Read with O_DIRECT (on `/...`, see `sys::on_fuse`).
    direct: bool,
}

impl PageFile {
    pub(super) fn new(path: PathBuf, len: u64) -> PageFile {
        PageFile {
            direct: path.parent().is_some_and(crate::sys::on_fuse),
            path,
            file: None,
            len,
        }
    }
}

/// pages.img (and late.img, if the image has late pages).
pub(super) struct Source {
    pub(super) main: PageFile,
    main_crcs: Vec<u32>,
    late: Option<(PageFile, LateReader)>,
    /// (chunk key: index, with LATE for late.img; bytes).
    cache: Vec<(u64, Vec<u8>)>,
    stage: Vec<u8>,
    /// The buffer of the last read (reused).
    span: Vec<u8>,
    /// When late.ready was last read for [`available`](Self::available).
    last_poll: Option<Instant>,
    /// pages.img read ahead (started at the first reads in order).
    ahead: Option<ReadAhead>,
    /// The last chunk of pages.img read.
    last_main: Option<u64>,
    /// Chunks of pages.img read while pre-copy ran (see `restore::warm`).
    warm: Option<WarmPages>,
    /// Per chunk of pages.img: the bytes of runs in it not taken from `warm` yet.
    /// A warm chunk is freed once none are left (its pages are the next ones the
    /// kernel gives the process: touching memory never used before is what costs
    /// most in a copy on this VM).
    warm_need: Vec<u64>,
    /// Warm chunks to free at the next read (the last read's slice may point
    /// into them until then).
    warm_spent: Vec<u64>,
    /// Warm chunks no run needs, given back [`UNNEEDED_PER_READ`] at each read
    /// (from the end: the next to give back is last).
    warm_unneeded: Vec<u64>,
    /// Per chunk of pages.img: whether its warm copy matched its CRC (checked at
    /// its first use; a chunk that does not match is read from the store).
    warm_checked: Vec<Option<bool>>,
    /// Bytes served from `warm`.
    pub(super) warm_served: u64,
}

/// Warm chunks no run needs given back at each read: 16 MiB, about half a
/// millisecond.
const UNNEEDED_PER_READ: usize = 16;

impl Source {
    pub(super) fn new(
        m: &image::Manifest,
        images: &std::path::Path,
        warm: Option<WarmPages>,
    ) -> Source {
        Source::of(
            images,
            (m.pages_len, m.chunk_crcs.clone(), m.late_len),
            m.areas.iter().flat_map(|a| a.runs.iter().copied()),
            warm,
        )
    }

    /// A source for an image of `(pages_len, chunk_crcs, late_len)` whose runs
    /// `(address, pages, offset)` are `runs`.
    fn of(
        images: &std::path::Path,
        (pages_len, chunk_crcs, late_len): (u64, Vec<u32>, u64),
        runs: impl Iterator<Item = (u64, u64, u64)>,
        warm: Option<WarmPages>,
    ) -> Source {
        let mut warm_need = vec![0u64; chunk_crcs.len()];
        let mut unneeded = Vec::new();
        let mut warm = warm;
        if let Some(w) = warm.as_mut() {
            for (_, pages, off) in runs {
                if off & LATE == 0 {
                    add_per_chunk(
                        &mut warm_need,
                        off,
                        pages * crate::sys::page_size(),
                        |n, k| *n += k,
                    );
                }
            }
            // Chunks no run needs (copies replaced in the last rounds): their
            // memory serves the first copies. Given back a few at each read, not
            // here: this runs in the freeze, and freeing GiBs takes ~30 ms a GiB.
            for (c, _) in warm_need.iter().enumerate().rev().filter(|(_, &n)| n == 0) {
                if w.has(c as u64) {
                    unneeded.push(c as u64);
                }
            }
        }
        Source {
            main: PageFile::new(images.join(image::PAGES_FILE), pages_len),
            warm_checked: vec![None; chunk_crcs.len()],
            main_crcs: chunk_crcs,
            late: (late_len > 0).then(|| {
                (
                    PageFile::new(images.join(image::LATE_FILE), late_len),
                    LateReader::new(images, late_len),
                )
            }),
            cache: Vec::new(),
            stage: Vec::new(),
            span: Vec::new(),
            last_poll: None,
            ahead: None,
            last_main: None,
            warm,
            warm_need,
            warm_spent: Vec::new(),
            warm_unneeded: unneeded,
            warm_served: 0,
        }
    }

    /// Whether chunk `i` of pages.img may be taken from the warm pages (checked
    /// against its CRC the first time).
    fn warm_ok(&mut self, i: u64) -> bool {
        let Some(w) = self.warm.as_ref() else {
            return false;
        };
        let Some(slot) = self.warm_checked.get_mut(i as usize) else {
            return false;
        };
        *slot.get_or_insert_with(|| {
            let Some(bytes) = w.chunk(i) else {
                return false;
            };
            let ok = self.main_crcs.get(i as usize) == Some(&crc32c::crc32c(bytes));
            if !ok {
                tracing::debug!(
                    chunk = i,
                    "the chunk read during pre-copy does not match its checksum; reading it from the store"
                );
            }
            ok
        })
    }

    /// After chunk `i` of pages.img was taken: if reads go in order, the next
    /// ones are read ahead.
    fn read_ahead_after(&mut self, i: u64) {
        let in_order = self.last_main.is_some_and(|l| l + 1 == i);
        self.last_main = Some(i);
        if !in_order {
            return;
        }
        let chunks = self.main.len.div_ceil(image::CHUNK);
        let (path, len) = (self.main.path.clone(), self.main.len);
        let crcs = &self.main_crcs;
        let ahead = self
            .ahead
            .get_or_insert_with(|| ReadAhead::start(path, len, crcs.clone()));
        let cache = &self.cache;
        // Chunks read during pre-copy are not read again (unless found bad).
        let (warm, checked) = (self.warm.as_ref(), &self.warm_checked);
        let warm_has = |c: u64| {
            warm.is_some_and(|w| w.has(c)) && checked.get(c as usize) != Some(&Some(false))
        };
        ahead.ask_after(i, chunks, |c| {
            warm_has(c) || cache.iter().any(|(k, _)| *k == c)
        });
    }

    /// The expected CRC of chunk `key`, waiting (a while) for a late one.
    fn crc(&mut self, key: u64) -> Result<u32, SourceError> {
        let i = key & !LATE;
        if key & LATE == 0 {
            return self.main_crcs.get(i as usize).copied().ok_or_else(|| {
                SourceError::store(format!("chunk {i} of pages.img has no checksum"))
            });
        }
        let (_, reader) = self.late.as_mut().ok_or_else(|| {
            SourceError::store("a late page but no late.img in this image".to_string())
        })?;
        reader
            .wait_ready(i)
            .map_err(|(msg, not_yet)| SourceError { msg, not_yet })
    }

    fn chunk(&mut self, key: u64) -> Result<usize, SourceError> {
        if let Some(p) = self.cache.iter().position(|(c, _)| *c == key) {
            return Ok(p);
        }
        let i = key & !LATE;
        if key & LATE == 0 {
            let early = self.ahead.as_mut().and_then(|a| a.take(i));
            if let Some(buf) = early {
                if self.cache.len() >= CACHE_CHUNKS {
                    self.cache.remove(0);
                }
                self.cache.push((key, buf));
                self.read_ahead_after(i);
                return Ok(self.cache.len() - 1);
            }
        }
        let p = self.read_chunk(key)?;
        if key & LATE == 0 {
            self.read_ahead_after(i);
            // (It leaves the cache as it is: `p` still holds.)
        }
        Ok(p)
    }

    /// Reads chunk `key` into the cache (this thread, now). A late chunk comes with
    /// the listed chunks right after it (up to [`LATE_SPAN`] in one read: the source
    /// writes them a batch at a time, and each read of late.img is a fresh open and a
    /// few round trips to the store).
    fn read_chunk(&mut self, key: u64) -> Result<usize, SourceError> {
        let crc = self.crc(key)?;
        let i = key & !LATE;
        let mut crcs = vec![crc];
        if key & LATE != 0 {
            let reader = &self.late.as_ref().unwrap().1;
            let cached = |c: u64| self.cache.iter().any(|(k, _)| *k == LATE | c);
            for c in i + 1..i + LATE_SPAN {
                match reader.crc(c) {
                    Some(crc) if !cached(c) => crcs.push(crc),
                    _ => break,
                }
            }
        }
        let pf = match key & LATE {
            0 => &mut self.main,
            _ => &mut self.late.as_mut().unwrap().0,
        };
        if key & LATE != 0 {
            // A late chunk is read once, through a handle opened for it (see
            // `LateReader::poll` on handles kept open).
            pf.file = None;
        }
        if pf.file.is_none() {
            let f = crate::sys::open_read(&pf.path, pf.direct)
                .map_err(|e| SourceError::store(format!("open {}: {e}", pf.path.display())))?;
            pf.file = Some(f);
        }
        let lo = i * image::CHUNK;
        let len = (pf.len - lo).min(image::CHUNK * crcs.len() as u64) as usize;
        let mut buf = std::mem::take(&mut self.span);
        buf.resize(len, 0);
        let f = pf.file.as_ref().unwrap();
        if key & LATE != 0 {
            // Listed in late.ready, so written, but our node may hold pages of it
            // read before (zeros) or a size from before: see `late::fresh_view`.
            crate::engine::late::fresh_view(f, lo);
        }
        if let Err(e) = f.read_exact_at(&mut buf, lo) {
            // A broken store connection stays broken on this fd: reopen next time.
            pf.file = None;
            self.span = buf;
            return Err(SourceError::store(format!(
                "{} read at {lo}: {e}",
                pf.path.display()
            )));
        }
        for (k, (piece, crc)) in buf.chunks(image::CHUNK as usize).zip(&crcs).enumerate() {
            if *crc != crc32c::crc32c(piece) {
                pf.file = None;
                let c = i + k as u64;
                if k == 0 {
                    self.span = buf;
                    return Err(SourceError::store(format!(
                        "{} chunk {c} (bytes {}..): checksum mismatch",
                        pf.path.display(),
                        c * image::CHUNK
                    )));
                }
                // Only the one asked for must be right now; the rest is read again.
                crcs.truncate(k);
                break;
            }
        }
        let evict = |cache: &mut Vec<(u64, Vec<u8>)>| match cache.len() >= CACHE_CHUNKS {
            true => cache.remove(0).1,
            false => Vec::new(),
        };
        if crcs.len() == 1 {
            // One chunk: the buffer itself goes into the cache (no copy).
            buf.truncate((pf.len - lo).min(image::CHUNK) as usize);
            self.span = evict(&mut self.cache);
            self.cache.push((key, buf));
            return Ok(self.cache.len() - 1);
        }
        for (k, piece) in buf
            .chunks(image::CHUNK as usize)
            .take(crcs.len())
            .enumerate()
            .rev()
        {
            let mut chunk = evict(&mut self.cache);
            chunk.clear();
            chunk.extend_from_slice(piece);
            self.cache.push(((key & LATE) | (i + k as u64), chunk));
        }
        self.span = buf;
        // Pushed last: the one asked for.
        Ok(self.cache.len() - 1)
    }

    /// `len` bytes at `off` (an offset in pages.img, or in late.img with [`LATE`]).
    pub(super) fn read(&mut self, off: u64, len: u64) -> Result<&[u8], SourceError> {
        let space = off & LATE;
        let off = off & !LATE;
        let total = match space {
            0 => self.main.len,
            _ => self.late.as_ref().map_or(0, |l| l.0.len),
        };
        if off + len > total {
            return Err(SourceError::store(format!(
                "bytes {off}..{} beyond its end",
                off + len
            )));
        }
        let (c0, c1) = (off / image::CHUNK, (off + len - 1) / image::CHUNK);
        if let Some(w) = self.warm.as_mut() {
            let rest = self.warm_unneeded.len().saturating_sub(UNNEEDED_PER_READ);
            for c in self
                .warm_spent
                .drain(..)
                .chain(self.warm_unneeded.drain(rest..))
            {
                w.drop_chunk(c);
            }
        }
        if space == 0 && (c0..=c1).all(|c| self.warm_ok(c)) {
            self.warm_served += len;
            add_per_chunk(&mut self.warm_need, off, len, |n, k| {
                *n = n.saturating_sub(k);
            });
            let need = &self.warm_need;
            self.warm_spent
                .extend((c0..=c1).filter(|&c| need.get(c as usize) == Some(&0)));
            let warm = self.warm.as_ref().expect("warm_ok saw it");
            return Ok(warm.slice(off, len).expect("whole chunks were read"));
        }
        if c0 == c1 {
            let p = self.chunk(space | c0)?;
            let lo = (off - c0 * image::CHUNK) as usize;
            return Ok(&self.cache[p].1[lo..lo + len as usize]);
        }
        let mut stage = std::mem::take(&mut self.stage);
        stage.clear();
        for c in c0..=c1 {
            let p = match self.chunk(space | c) {
                Ok(p) => p,
                Err(e) => {
                    self.stage = stage;
                    return Err(e);
                }
            };
            let base = c * image::CHUNK;
            let lo = off.max(base) - base;
            let hi = (off + len).min(base + image::CHUNK) - base;
            stage.extend_from_slice(&self.cache[p].1[lo as usize..hi as usize]);
        }
        self.stage = stage;
        Ok(&self.stage)
    }

    /// [`read`](Self::read), waiting up to `bound` for late pages the source has not
    /// written yet (for the restore itself, before the process runs).
    pub(super) fn read_waiting(
        &mut self,
        off: u64,
        len: u64,
        bound: Duration,
    ) -> Result<Vec<u8>, String> {
        let t0 = Instant::now();
        loop {
            match self.read(off, len) {
                Ok(d) => return Ok(d.to_vec()),
                Err(e) if t0.elapsed() > bound => return Err(e.msg),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Whether `len` bytes at `off` can be read without waiting for the source (late
    /// chunks not written yet are asked for). late.ready is read at most every
    /// millisecond.
    pub(super) fn available(&mut self, off: u64, len: u64) -> bool {
        if off & LATE == 0 || len == 0 {
            return true;
        }
        let Some((_, reader)) = self.late.as_mut() else {
            return true;
        };
        let off = off & !LATE;
        let (c0, c1) = (off / image::CHUNK, (off + len - 1) / image::CHUNK);
        if (c0..=c1).all(|c| reader.crc(c).is_some()) {
            return true;
        }
        if self
            .last_poll
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(1))
        {
            self.last_poll = Some(Instant::now());
            let _ = reader.poll();
        }
        match (c0..=c1).find(|&c| reader.crc(c).is_none()) {
            None => true,
            Some(c) => {
                // The source writes what the destination heads for next.
                let _ = reader.want(c);
                false
            }
        }
    }

    /// Every page is in: the source may stop writing late pages.
    pub(super) fn all_in(&mut self) {
        if let Some((_, reader)) = self.late.as_mut() {
            reader.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::restore::warm;

    #[test]
    fn warm_chunks_are_served_checked_and_freed_once_used() {
        let dir = tempfile::tempdir().unwrap();
        let c = image::CHUNK;
        let data: Vec<u8> = (0..5 * c).map(|i| (i * 13 % 253) as u8).collect();
        let crcs: Vec<u32> = data.chunks(c as usize).map(crc32c::crc32c).collect();
        let pages = dir.path().join(image::PAGES_FILE);
        // What was read during pre-copy holds a bad chunk 1; the store is right.
        let mut bad = data.clone();
        bad[(c + 100) as usize] ^= 0xff;
        std::fs::write(&pages, &bad).unwrap();
        let w = warm::read_now(dir.path(), 5 * c).unwrap();
        assert!(w.has(4));
        std::fs::write(&pages, &data).unwrap();
        let per_chunk = c / 4096;
        let runs = [
            (0x10000000, per_chunk, 0),
            (0x20000000, 2 * per_chunk, c),
            (0x30000000, per_chunk, 3 * c),
        ];
        let mut src = Source::of(dir.path(), (5 * c, crcs, 0), runs.into_iter(), Some(w));
        assert!(
            src.warm.as_ref().unwrap().has(4),
            "chunk 4 is not given back in the restore (the freeze)"
        );
        let chunk = |i: u64| &data[(i * c) as usize..((i + 1) * c) as usize];

        assert_eq!(src.read(0, c).unwrap(), chunk(0));
        assert!(
            !src.warm.as_ref().unwrap().has(4),
            "chunk 4, which no run needs, is given back at the first read"
        );
        assert_eq!(src.warm_served, c, "chunk 0 comes from memory");
        // Chunk 1's copy does not match its CRC: the span is read from the store.
        assert_eq!(
            src.read(c, 2 * c).unwrap(),
            &data[c as usize..(3 * c) as usize]
        );
        assert_eq!(
            src.warm_served, c,
            "a chunk that does not match is not served"
        );
        let warm = src.warm.as_ref().unwrap();
        assert!(
            !warm.has(0),
            "chunk 0 was used in full: its memory is given back"
        );
        // With the store gone, what is warm still comes, from memory.
        std::fs::remove_file(&pages).unwrap();
        assert_eq!(
            src.read(3 * c + 4096, 8192).unwrap(),
            &chunk(3)[4096..12288]
        );
        assert_eq!(src.warm_served, c + 8192);
        assert!(src.warm.as_ref().unwrap().has(3), "chunk 3 is still needed");
    }
}
