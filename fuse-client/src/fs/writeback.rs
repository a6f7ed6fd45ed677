//! Write-behind (FUSE-NOTES "Likely order of impact" 6): a write to a cached file is
//! acknowledged to the kernel as soon as it is queued, and sent to fs-server in the
//! background, up to [`DEPTH`] writes per file in flight, so that a stream of writes
//! keeps the network and the server busy instead of waiting one round trip each.
//!
//! What keeps it honest:
//! - Only writes through handles with page caching on files that are not
//!   write-shared; O_APPEND, O_SYNC and O_DSYNC writes, and every write to an
//!   uncached (write-shared) file, stay synchronous.
//! - A write overlapping one still in flight waits for the file's writes to land
//!   first, so the server never applies two writes of the same bytes out of order.
//! - Drained (every write landed) before: read, setattr, flush (close), fsync,
//!   release, locks, and before answering a server's invalidate callback, so that
//!   another node that opens the file afterwards reads what we wrote.
//! - While writes are in flight, sizes reported to the kernel are at least the end
//!   of the data written, so a stale size from the server never shrinks the file.
//! - The first failed background write is remembered and returned by the next write,
//!   flush or fsync of the file (as NFS does): `close` reports it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use common::fsproto::{FsError, FsResult};
use tokio::sync::Semaphore;

use super::{Inner, OpenState};
use crate::conn::rpc;

/// Writes in flight per file.
pub const DEPTH: u32 = 16;

#[derive(Default)]
struct State {
    /// (id, start, end) of each write in flight.
    inflight: Vec<(u64, u64, u64)>,
    next_id: u64,
    /// End of the furthest write in flight.
    max_end: u64,
    error: Option<FsError>,
}

/// One file's write-behind queue.
pub struct WriteBehind {
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

impl WriteBehind {
    fn new() -> WriteBehind {
        WriteBehind {
            slots: Arc::new(Semaphore::new(DEPTH as usize)),
            state: Mutex::new(State::default()),
        }
    }

    /// Waits until no write of this file is in flight.
    async fn settle(&self) {
        let all = self
            .slots
            .acquire_many(DEPTH)
            .await
            .expect("semaphore never closed");
        drop(all);
    }

    /// Waits until no write of this file is in flight; returns (and forgets) the
    /// first background failure.
    async fn drain(&self) -> FsResult<()> {
        self.settle().await;
        match self.state.lock().expect("wb lock").error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The per-file queues, by our inode number.
#[derive(Default)]
pub struct WriteBehinds(Mutex<HashMap<u64, Arc<WriteBehind>>>);

impl WriteBehinds {
    fn get(&self, ino: u64) -> Option<Arc<WriteBehind>> {
        self.0.lock().expect("wbs lock").get(&ino).cloned()
    }

    fn get_or_make(&self, ino: u64) -> Arc<WriteBehind> {
        self.0
            .lock()
            .expect("wbs lock")
            .entry(ino)
            .or_insert_with(|| Arc::new(WriteBehind::new()))
            .clone()
    }

    /// Forgets an idle, error-free queue (after release).
    fn prune(&self, ino: u64) {
        let mut map = self.0.lock().expect("wbs lock");
        if let Some(wb) = map.get(&ino) {
            let st = wb.state.lock().expect("wb lock");
            if st.inflight.is_empty() && st.error.is_none() && Arc::strong_count(wb) == 1 {
                drop(st);
                map.remove(&ino);
            }
        }
    }

    /// The size to report for `ino` given the server's `size`.
    pub fn size_floor(&self, ino: u64, size: u64) -> u64 {
        match self.get(ino) {
            Some(wb) => {
                let st = wb.state.lock().expect("wb lock");
                if st.inflight.is_empty() {
                    size
                } else {
                    size.max(st.max_end)
                }
            }
            None => size,
        }
    }
}

impl Inner {
    /// Waits for every queued write of `ino` to land; returns a background failure.
    pub(crate) async fn drain(&self, ino: u64) -> FsResult<()> {
        match self.writebehind.get(ino) {
            Some(wb) => wb.drain().await,
            None => Ok(()),
        }
    }

    /// Waits for every queued write of `ino` to land, leaving any failure to be
    /// reported by the next write, flush or fsync.
    pub(crate) async fn settle(&self, ino: u64) {
        if let Some(wb) = self.writebehind.get(ino) {
            wb.settle().await;
        }
    }

    /// Drains `ino` and drops its queue if nothing else uses it.
    pub(crate) async fn drain_and_prune(&self, ino: u64) -> FsResult<()> {
        let r = self.drain(ino).await;
        self.writebehind.prune(ino);
        r
    }

    /// Whether a write through `st` may be queued rather than waited for.
    pub(crate) fn may_write_behind(&self, st: &OpenState) -> bool {
        if st.direct || st.file.flags & (libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC) != 0 {
            return false;
        }
        !self
            .inodes
            .lock()
            .expect("inode lock")
            .get(st.ino)
            .is_none_or(|n| n.uncached)
    }

    /// Queues a write and answers at once (see the module comment).
    pub(crate) async fn write_behind(
        self: &Arc<Self>,
        st: Arc<OpenState>,
        offset: u64,
        data: serde_bytes::ByteBuf,
    ) -> FsResult<u32> {
        let len = data.len() as u64;
        let end = offset + len;
        let wb = self.writebehind.get_or_make(st.ino);
        let overlaps = {
            let s = wb.state.lock().expect("wb lock");
            s.inflight.iter().any(|&(_, a, b)| a < end && offset < b)
        };
        if overlaps || wb.state.lock().expect("wb lock").error.is_some() {
            wb.drain().await?;
        }
        let slot = wb
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let id = {
            let mut s = wb.state.lock().expect("wb lock");
            let id = s.next_id;
            s.next_id += 1;
            s.inflight.push((id, offset, end));
            s.max_end = s.max_end.max(end);
            id
        };
        let (creds, file, server) = (st.creds.clone(), st.file.clone(), st.server.clone());
        self.rt.spawn(async move {
            let r = rpc!(server, write(creds, file, offset, data)).await;
            let mut s = wb.state.lock().expect("wb lock");
            let failure = match r {
                Ok(n) if n as u64 == len => None,
                Ok(n) => Some(FsError::new(
                    libc::EIO,
                    format!("background write at {offset}: server wrote {n} of {len} bytes"),
                )),
                Err(e) => Some(e),
            };
            if let Some(e) = failure {
                tracing::warn!(error = %e, offset, len, "background write failed; reported at the next write, flush or fsync");
                s.error.get_or_insert(e);
            }
            s.inflight.retain(|&(i, _, _)| i != id);
            if s.inflight.is_empty() {
                s.max_end = 0;
            }
            drop(s);
            drop(slot);
        });
        Ok(len as u32)
    }
}
