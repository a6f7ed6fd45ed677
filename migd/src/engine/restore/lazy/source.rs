//! pages.img as the pager reads it: whole chunks, each checked against its CRC-32C,
//! a few kept in memory; a failed read drops the file so that the next one reopens
//! it by path (a store whose server restarted answers on a new connection).

use crate::engine::image;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Chunks of pages.img kept in memory (each [`image::CHUNK`] bytes).
const CACHE_CHUNKS: usize = 16;

/// pages.img, read in whole chunks whose CRC-32C is checked, a few kept in memory.
pub(super) struct Source {
    pub(super) path: PathBuf,
    pub(super) file: Option<std::fs::File>,
    pub(super) len: u64,
    pub(super) crcs: Vec<u32>,
    pub(super) cache: Vec<(u64, Vec<u8>)>,
    pub(super) stage: Vec<u8>,
}

impl Source {
    fn chunk(&mut self, i: u64) -> Result<usize, String> {
        if let Some(p) = self.cache.iter().position(|(c, _)| *c == i) {
            return Ok(p);
        }
        if self.file.is_none() {
            let f = std::fs::File::open(&self.path).map_err(|e| format!("open: {e}"))?;
            self.file = Some(f);
        }
        let lo = i * image::CHUNK;
        let len = (self.len - lo).min(image::CHUNK) as usize;
        let mut buf = if self.cache.len() >= CACHE_CHUNKS {
            self.cache.remove(0).1
        } else {
            Vec::new()
        };
        buf.resize(len, 0);
        let r = self.file.as_ref().unwrap().read_exact_at(&mut buf, lo);
        if let Err(e) = r {
            // A broken store connection stays broken on this fd: reopen next time.
            self.file = None;
            return Err(format!("read at {lo}: {e}"));
        }
        if self.crcs.get(i as usize) != Some(&crc32c::crc32c(&buf)) {
            self.file = None;
            return Err(format!("chunk {i} (bytes {lo}..): checksum mismatch"));
        }
        self.cache.push((i, buf));
        Ok(self.cache.len() - 1)
    }

    /// `len` bytes at `off`.
    pub(super) fn read(&mut self, off: u64, len: u64) -> Result<&[u8], String> {
        if off + len > self.len {
            return Err(format!("bytes {off}..{} beyond its end", off + len));
        }
        let (c0, c1) = (off / image::CHUNK, (off + len - 1) / image::CHUNK);
        if c0 == c1 {
            let p = self.chunk(c0)?;
            let lo = (off - c0 * image::CHUNK) as usize;
            return Ok(&self.cache[p].1[lo..lo + len as usize]);
        }
        let mut stage = std::mem::take(&mut self.stage);
        stage.clear();
        for c in c0..=c1 {
            let p = match self.chunk(c) {
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
}
