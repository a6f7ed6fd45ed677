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
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Chunks kept in memory (each [`image::CHUNK`] bytes).
const CACHE_CHUNKS: usize = 16;

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
}

impl PageFile {
    pub(super) fn new(path: PathBuf, len: u64) -> PageFile {
        PageFile {
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
    /// When late.ready was last read for [`available`](Self::available).
    last_poll: Option<Instant>,
}

impl Source {
    pub(super) fn new(m: &image::Manifest, images: &std::path::Path) -> Source {
        Source {
            main: PageFile::new(images.join(image::PAGES_FILE), m.pages_len),
            main_crcs: m.chunk_crcs.clone(),
            late: (m.late_len > 0).then(|| {
                (
                    PageFile::new(images.join(image::LATE_FILE), m.late_len),
                    LateReader::new(images, m.late_len),
                )
            }),
            cache: Vec::new(),
            stage: Vec::new(),
            last_poll: None,
        }
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
        let crc = self.crc(key)?;
        let i = key & !LATE;
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
            let f = std::fs::File::open(&pf.path)
                .map_err(|e| SourceError::store(format!("open {}: {e}", pf.path.display())))?;
            pf.file = Some(f);
        }
        let lo = i * image::CHUNK;
        let len = (pf.len - lo).min(image::CHUNK) as usize;
        let mut buf = if self.cache.len() >= CACHE_CHUNKS {
            self.cache.remove(0).1
        } else {
            Vec::new()
        };
        buf.resize(len, 0);
        let f = pf.file.as_ref().unwrap();
        if key & LATE != 0 {
            // Listed in late.ready, so written, but our node may hold pages of it
            // read before (zeros) or a size from before: see `late::fresh_view`.
            crate::engine::late::fresh_view(f, lo);
        }
        let r = f.read_exact_at(&mut buf, lo);
        if let Err(e) = r {
            // A broken store connection stays broken on this fd: reopen next time.
            pf.file = None;
            return Err(SourceError::store(format!(
                "{} read at {lo}: {e}",
                pf.path.display()
            )));
        }
        if crc != crc32c::crc32c(&buf) {
            pf.file = None;
            return Err(SourceError::store(format!(
                "{} chunk {i} (bytes {lo}..): checksum mismatch",
                pf.path.display()
            )));
        }
        self.cache.push((key, buf));
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
