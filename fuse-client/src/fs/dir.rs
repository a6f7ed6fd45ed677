//! Directory listing: opendir, readdir, readdirplus.
//!
//! The kernel's offsets are the server's cookies (each entry carries the cookie to go
//! on after it). The server is asked for more entries than one kernel buffer holds;
//! the rest wait in the open directory's buffer for the next call, so a listing costs
//! about one round trip per few hundred entries. The super-root is listed from the
//! volume list, its offsets being positions in that list.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use common::fsproto::{Creds, DirEntry, FileHandle, FileKind, FsError, FsResult};
use fuser::{FileType, Generation, INodeNo, ReplyDirectory, ReplyDirectoryPlus};

use super::{log_err, Inner};
use crate::conn::rpc;
use crate::conn::ServerConn;
use crate::convert::{errno, file_attr, file_type};
use crate::inodes::ROOT_INO;

/// Entries asked of the server per readdir call.
const BATCH: u32 = 256;
/// Entries asked per readdirplus call (each carries attributes).
const BATCH_PLUS: u32 = 64;

/// An open directory.
pub struct DirState {
    /// None for the super-root.
    target: Option<(Arc<ServerConn>, FileHandle)>,
    creds: Creds,
    /// Entries fetched but not yet given to the kernel, continuing from `buffer_from`.
    buffer: VecDeque<DirEntry>,
    buffer_from: u64,
    buffer_plus: bool,
    /// The super-root's names, fixed at the first read so offsets stay meaningful.
    root_names: Option<Vec<String>>,
}

/// A stable stand-in for d_ino when the server gave no attributes.
fn pseudo_ino(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | (1 << 63)
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

impl Inner {
    pub(crate) fn opendir(&self, creds: Creds, ino: u64) -> FsResult<u64> {
        let target = if ino == ROOT_INO {
            None
        } else {
            let node = self.node(ino)?;
            if node.kind != FileKind::Dir {
                return Err(FsError::new(
                    libc::ENOTDIR,
                    format!("inode {ino} is not a directory"),
                ));
            }
            Some((node.server, node.handle))
        };
        let fh = self.new_fh();
        let state = DirState {
            target,
            creds,
            buffer: VecDeque::new(),
            buffer_from: 0,
            buffer_plus: false,
            root_names: None,
        };
        self.dirs
            .lock()
            .expect("dirs lock")
            .insert(fh, Arc::new(tokio::sync::Mutex::new(state)));
        Ok(fh)
    }

    fn dir_state(&self, fh: u64) -> FsResult<Arc<tokio::sync::Mutex<DirState>>> {
        self.dirs
            .lock()
            .expect("dirs lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::new(libc::EBADF, format!("no open directory {fh}")))
    }

    /// The super-root's listing: `.`, `..`, then the volumes.
    async fn root_listing(&self, st: &mut DirState, offset: u64) -> Vec<(u64, String, FileType)> {
        if st.root_names.is_none() || offset == 0 {
            st.root_names = Some(self.volume_names().await);
        }
        let mut all = vec![
            (ROOT_INO, ".".to_string(), FileType::Directory),
            (ROOT_INO, "..".to_string(), FileType::Directory),
        ];
        for v in st.root_names.as_ref().expect("just set") {
            all.push((pseudo_ino(v.as_bytes()), v.clone(), FileType::Directory));
        }
        all
    }

    /// Makes sure the buffer continues from `offset` in the wanted mode and is not
    /// empty unless the directory has no more entries.
    async fn fill(&self, st: &mut DirState, offset: u64, plus: bool) -> FsResult<()> {
        if !st.buffer.is_empty() && st.buffer_from == offset && st.buffer_plus == plus {
            return Ok(());
        }
        let (server, dir) = st.target.clone().expect("not the super-root");
        let creds = st.creds.clone();
        let max = if plus { BATCH_PLUS } else { BATCH };
        let entries = rpc!(server, readdir(creds, dir, offset, max, plus)).await?;
        st.buffer = entries.into();
        st.buffer_from = offset;
        st.buffer_plus = plus;
        Ok(())
    }

    pub(crate) async fn readdir(&self, ino: u64, fh: u64, offset: u64, mut reply: ReplyDirectory) {
        let st = match self.dir_state(fh) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut st = st.lock().await;
        if st.target.is_none() {
            let all = self.root_listing(&mut st, offset).await;
            for (i, (ino, name, kind)) in all.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                    break;
                }
            }
            return reply.ok();
        }
        let mut offset = offset;
        loop {
            if let Err(e) = self.fill(&mut st, offset, false).await {
                log_err("readdir", &e);
                return reply.error(errno(&e));
            }
            if st.buffer.is_empty() {
                break;
            }
            let mut full = false;
            while let Some(e) = st.buffer.front().cloned() {
                let d_ino = if is_dot(&e.name) {
                    ino
                } else {
                    pseudo_ino(&e.name)
                };
                if reply.add(
                    INodeNo(d_ino),
                    e.cookie,
                    file_type(e.kind),
                    OsStr::from_bytes(&e.name),
                ) {
                    full = true;
                    break;
                }
                offset = e.cookie;
                st.buffer_from = e.cookie;
                st.buffer.pop_front();
            }
            if full {
                break;
            }
        }
        reply.ok()
    }

    pub(crate) async fn readdirplus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let st = match self.dir_state(fh) {
            Ok(s) => s,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut st = st.lock().await;
        if st.target.is_none() {
            // Volume roots may be on any node: look them up together, briefly; a
            // volume whose node does not answer now is left out of this listing
            // (a lookup by name still waits for it).
            let all = self.root_listing(&mut st, offset).await;
            let roots =
                futures::future::join_all(all.iter().enumerate().skip(offset as usize).map(
                    |(i, (_, name, _))| async move {
                        if i < 2 {
                            return Some((self.root_attr(), std::time::Duration::ZERO, false));
                        }
                        self.volume_root_quick(name)
                            .await
                            .ok()
                            .map(|out| (out.attr, out.ttl, true))
                    },
                ))
                .await;
            let mut full = false;
            for ((i, (_, name, _)), root) in all.iter().enumerate().skip(offset as usize).zip(roots)
            {
                let Some((attr, ttl, counted)) = root else {
                    continue;
                };
                if full || reply.add(attr.ino, i as u64 + 1, name, &ttl, &attr, Generation(0)) {
                    full = true;
                    if counted {
                        self.inodes
                            .lock()
                            .expect("inode lock")
                            .forget(attr.ino.0, 1);
                    }
                }
            }
            return reply.ok();
        }
        let server = st.target.as_ref().expect("not the super-root").0.clone();
        let mut offset = offset;
        loop {
            if let Err(e) = self.fill(&mut st, offset, true).await {
                log_err("readdirplus", &e);
                return reply.error(errno(&e));
            }
            if st.buffer.is_empty() {
                break;
            }
            let mut full = false;
            while let Some(e) = st.buffer.front().cloned() {
                let name = OsStr::from_bytes(&e.name);
                let (added_ino, out) = match &e.entry {
                    Some(entry) if !is_dot(&e.name) => {
                        let out = self.remember(&server, entry);
                        (Some(out.attr.ino.0), (out.attr, out.ttl))
                    }
                    Some(entry) => (
                        None,
                        (file_attr(ino, &entry.attr), std::time::Duration::ZERO),
                    ),
                    None => {
                        // The server gave no attributes: look the name up.
                        let (creds, dir, n) = (
                            st.creds.clone(),
                            st.target.clone().expect("dir").1,
                            e.name.clone(),
                        );
                        match rpc!(server, lookup(creds, dir, n)).await {
                            Ok(entry) => {
                                let out = self.remember(&server, &entry);
                                (Some(out.attr.ino.0), (out.attr, out.ttl))
                            }
                            Err(_) => {
                                // Gone meanwhile: skip it.
                                let c = e.cookie;
                                offset = c;
                                st.buffer_from = c;
                                st.buffer.pop_front();
                                continue;
                            }
                        }
                    }
                };
                if reply.add(out.0.ino, e.cookie, name, &out.1, &out.0, Generation(0)) {
                    if let Some(i) = added_ino {
                        // Not sent: the kernel will not count this lookup.
                        self.inodes.lock().expect("inode lock").forget(i, 1);
                    }
                    full = true;
                    break;
                }
                offset = e.cookie;
                st.buffer_from = e.cookie;
                st.buffer.pop_front();
            }
            if full {
                break;
            }
        }
        reply.ok()
    }
}
