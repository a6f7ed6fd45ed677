//! The file operations: each one a file-service call (or two) plus the inode-table
//! and cache bookkeeping around it.

use std::sync::Arc;
use std::time::Duration;

use common::fsproto::{
    CacheMode, Creds, Entry, FsError, FsResult, Lock, OpenFile, SetAttr, StatFs,
};
use fuser::{FileAttr, FopenFlags};

use super::{root_is_read_only, EntryOut, Inner, OpenState};
use crate::conn::rpc;
use crate::conn::ServerConn;
use crate::inodes::{Node, ROOT_INO};
use crate::volumes::{ASK_PATIENCE, LIST_MAX_AGE, MISS_MAX_AGE};

/// Longest pause between two tries of a blocking lock.
const LOCK_POLL_MAX: Duration = Duration::from_millis(500);

impl Inner {
    /// The node of `ino` (ESTALE if the kernel names one we forgot).
    pub(crate) fn node(&self, ino: u64) -> FsResult<Node> {
        self.inodes
            .lock()
            .expect("inode lock")
            .get(ino)
            .ok_or_else(|| {
                FsError::new(
                    libc::ESTALE,
                    format!("inode {ino} is not known to this client"),
                )
            })
    }

    /// Records a kernel lookup of `entry` and builds the entry reply.
    pub(crate) fn remember(&self, server: &Arc<ServerConn>, entry: &Entry) -> EntryOut {
        let mut table = self.inodes.lock().expect("inode lock");
        let ino = table.remember(server, &entry.handle, entry.attr.ino, entry.attr.kind);
        let uncached = table.get(ino).is_some_and(|n| n.uncached);
        EntryOut {
            attr: self.attr_of(ino, &entry.attr),
            ttl: self.ttl(uncached),
        }
    }

    /// A directory that may hold new entries: not the super-root.
    fn dir_node(&self, ino: u64, what: &str) -> FsResult<Node> {
        if ino == ROOT_INO {
            return Err(root_is_read_only(what));
        }
        self.node(ino)
    }

    pub(crate) async fn lookup(
        self: &Arc<Self>,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
    ) -> FsResult<EntryOut> {
        if parent == ROOT_INO {
            return self.lookup_volume(name).await;
        }
        let node = self.node(parent)?;
        let handle = node.handle.clone();
        let entry = rpc!(node.server, lookup(creds, handle, name)).await?;
        let out = self.remember(&node.server, &entry);
        tracing::trace!(parent, ino = out.attr.ino.0, size = out.attr.size, "lookup");
        Ok(out)
    }

    /// `/.../<volume>`: the root of a volume, served by whichever node exports it.
    async fn lookup_volume(self: &Arc<Self>, name: Vec<u8>) -> FsResult<EntryOut> {
        let missing = || FsError::new(libc::ENOENT, "no such volume in the cluster");
        let volume = String::from_utf8(name).map_err(|_| missing())?;
        let server = self.volume_server(&volume, true).await?;
        let entry = rpc!(server, root(volume)).await?;
        Ok(self.remember(&server, &entry))
    }

    /// The root of a volume, asked with little patience (for listings).
    pub(crate) async fn volume_root_quick(&self, volume: &str) -> FsResult<EntryOut> {
        let server = self.volume_server(volume, false).await?;
        let v = volume.to_string();
        let entry = server
            .call_with("root", ASK_PATIENCE, ASK_PATIENCE, move |c, ctx| {
                let v = v.clone();
                async move { c.root(ctx, v).await }
            })
            .await?;
        Ok(self.remember(&server, &entry))
    }

    /// The fs-server of a volume; refreshes the volume list on a miss if `refresh`.
    async fn volume_server(&self, volume: &str, refresh: bool) -> FsResult<Arc<ServerConn>> {
        let missing = || FsError::new(libc::ENOENT, format!("no volume {volume:?} in the cluster"));
        if common::config::check_name(volume).is_err() {
            return Err(missing());
        }
        let node = {
            let mut volumes = self.volumes.lock().await;
            if refresh && volumes.node_of(volume).is_none() && volumes.stale(MISS_MAX_AGE) {
                volumes.refresh(&self.servers).await;
            }
            volumes.node_of(volume).map(str::to_string)
        };
        let node = node.ok_or_else(missing)?;
        self.servers.get(&node).cloned().ok_or_else(|| {
            FsError::new(
                libc::ENOENT,
                format!("volume {volume} is on unknown node {node}"),
            )
        })
    }

    /// Volume names, refreshed if the list is old.
    pub(crate) async fn volume_names(&self) -> Vec<String> {
        let mut volumes = self.volumes.lock().await;
        if volumes.stale(LIST_MAX_AGE) {
            volumes.refresh(&self.servers).await;
        }
        volumes.list().into_iter().map(|(v, _)| v).collect()
    }

    pub(crate) async fn getattr(
        self: &Arc<Self>,
        ino: u64,
        _fh: Option<u64>,
    ) -> FsResult<(FileAttr, Duration)> {
        if ino == ROOT_INO {
            return Ok((self.root_attr(), self.ttl(false)));
        }
        let node = self.node(ino)?;
        let handle = node.handle.clone();
        let attr = rpc!(node.server, getattr(handle)).await?;
        tracing::trace!(ino, server_ino = attr.ino, size = attr.size, "getattr");
        Ok((self.attr_of(ino, &attr), self.ttl(node.uncached)))
    }

    pub(crate) async fn setattr(
        self: &Arc<Self>,
        creds: Creds,
        ino: u64,
        set: SetAttr,
        fh: Option<u64>,
    ) -> FsResult<(FileAttr, Duration)> {
        let node = self.dir_node(ino, "setattr")?;
        self.settle(ino).await;
        let open: Option<OpenFile> = fh
            .and_then(|fh| self.open_state(fh).ok())
            .map(|s| s.file.clone());
        let handle = node.handle.clone();
        let attr = rpc!(node.server, setattr(creds, handle, set, open)).await?;
        Ok((self.attr_of(ino, &attr), self.ttl(node.uncached)))
    }

    pub(crate) async fn readlink(self: &Arc<Self>, creds: Creds, ino: u64) -> FsResult<Vec<u8>> {
        let node = self.dir_node(ino, "readlink")?;
        let handle = node.handle.clone();
        rpc!(node.server, readlink(creds, handle)).await
    }

    pub(crate) async fn mknod(
        self: &Arc<Self>,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<EntryOut> {
        let node = self.dir_node(parent, "mknod")?;
        let handle = node.handle.clone();
        let entry = rpc!(node.server, mknod(creds, handle, name, mode, umask, rdev)).await?;
        Ok(self.remember(&node.server, &entry))
    }

    pub(crate) async fn mkdir(
        self: &Arc<Self>,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    ) -> FsResult<EntryOut> {
        let node = self.dir_node(parent, "mkdir")?;
        let handle = node.handle.clone();
        let entry = rpc!(node.server, mkdir(creds, handle, name, mode, umask)).await?;
        Ok(self.remember(&node.server, &entry))
    }

    pub(crate) async fn symlink(
        self: &Arc<Self>,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
    ) -> FsResult<EntryOut> {
        let node = self.dir_node(parent, "symlink")?;
        let handle = node.handle.clone();
        let entry = rpc!(node.server, symlink(creds, handle, name, target)).await?;
        Ok(self.remember(&node.server, &entry))
    }

    pub(crate) async fn unlink(
        self: &Arc<Self>,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        dir: bool,
    ) -> FsResult<()> {
        let node = self.dir_node(parent, if dir { "rmdir" } else { "unlink" })?;
        let handle = node.handle.clone();
        if dir {
            rpc!(node.server, rmdir(creds, handle, name)).await
        } else {
            rpc!(node.server, unlink(creds, handle, name)).await
        }
    }

    pub(crate) async fn rename(
        self: &Arc<Self>,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
    ) -> FsResult<()> {
        let from = self.dir_node(parent, "rename")?;
        let to = self.dir_node(new_parent, "rename")?;
        if from.server.node() != to.server.node() {
            return Err(FsError::new(
                libc::EXDEV,
                "rename across nodes: the volumes are served by different fs-servers",
            ));
        }
        let (a, b) = (from.handle.clone(), to.handle.clone());
        rpc!(from.server, rename(creds, a, name, b, new_name, flags)).await
    }

    pub(crate) async fn link(
        self: &Arc<Self>,
        creds: Creds,
        ino: u64,
        new_parent: u64,
        new_name: Vec<u8>,
    ) -> FsResult<EntryOut> {
        let target = self.dir_node(ino, "link")?;
        let dir = self.dir_node(new_parent, "link")?;
        if target.server.node() != dir.server.node() {
            return Err(FsError::new(
                libc::EXDEV,
                "link across nodes: the volumes are served by different fs-servers",
            ));
        }
        let (t, d) = (target.handle.clone(), dir.handle.clone());
        let entry = rpc!(dir.server, link(creds, t, d, new_name)).await?;
        Ok(self.remember(&dir.server, &entry))
    }

    /// Turns a server's open answer into our open file and the kernel's open flags.
    fn opened(
        &self,
        ino: u64,
        server: &Arc<ServerConn>,
        creds: Creds,
        file: OpenFile,
        cache: CacheMode,
    ) -> (u64, FopenFlags) {
        let (mut fopen, uncached) = match cache {
            CacheMode::Cached { keep: true } => (FopenFlags::FOPEN_KEEP_CACHE, false),
            CacheMode::Cached { keep: false } => (FopenFlags::empty(), false),
            CacheMode::Uncached => (FopenFlags::FOPEN_DIRECT_IO, true),
        };
        // An O_APPEND write through the page cache may reach us split at page
        // boundaries, and the server appends each piece on its own: another node's
        // append could land between them. Direct I/O sends each write(2) whole.
        let direct = uncached || file.flags & libc::O_APPEND != 0;
        if direct {
            fopen = FopenFlags::FOPEN_DIRECT_IO;
        }
        self.inodes
            .lock()
            .expect("inode lock")
            .set_uncached(ino, uncached);
        let fh = self.new_fh();
        let state = OpenState {
            ino,
            server: server.clone(),
            file,
            creds,
            direct,
            positional: tokio::sync::OnceCell::new(),
        };
        self.opens
            .lock()
            .expect("opens lock")
            .insert(fh, Arc::new(state));
        (fh, fopen)
    }

    pub(crate) async fn open(
        self: &Arc<Self>,
        creds: Creds,
        ino: u64,
        flags: i32,
    ) -> FsResult<(u64, FopenFlags)> {
        let node = self.dir_node(ino, "open")?;
        let handle = node.handle.clone();
        let c = creds.clone();
        let opened = rpc!(node.server, open(c, handle, flags)).await?;
        let file = OpenFile {
            id: opened.id,
            handle: node.handle.clone(),
            flags,
        };
        Ok(self.opened(ino, &node.server, creds, file, opened.cache))
    }

    pub(crate) async fn create(
        self: &Arc<Self>,
        creds: Creds,
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> FsResult<(EntryOut, u64, FopenFlags)> {
        let dir = self.dir_node(parent, "create")?;
        let handle = dir.handle.clone();
        let c = creds.clone();
        let (entry, opened) = rpc!(dir.server, create(c, handle, name, mode, umask, flags)).await?;
        let out = self.remember(&dir.server, &entry);
        let ino = out.attr.ino.0;
        let file = OpenFile {
            id: opened.id,
            handle: entry.handle.clone(),
            flags,
        };
        let (fh, fopen) = self.opened(ino, &dir.server, creds, file, opened.cache);

        let uncached = matches!(opened.cache, CacheMode::Uncached);
        Ok((
            EntryOut {
                ttl: self.ttl(uncached),
                ..out
            },
            fh,
            fopen,
        ))
    }

    pub(crate) async fn read(
        self: &Arc<Self>,
        _ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> FsResult<serde_bytes::ByteBuf> {
        let st = self.open_state(fh)?;
        self.settle(st.ino).await;
        let (creds, file) = (st.creds.clone(), st.file.clone());
        rpc!(st.server, read(creds, file, offset, size)).await
    }

    pub(crate) async fn write(
        self: &Arc<Self>,
        fh: u64,
        offset: u64,
        data: serde_bytes::ByteBuf,
        from_cache: bool,
    ) -> FsResult<u32> {
        let st = self.open_state(fh)?;
        if from_cache && st.file.flags & libc::O_APPEND != 0 {
            // Write-back of a shared mapping through an O_APPEND open: the server
            // would append it; write it at its offset through a plain open instead.
            let file = self.positional_open(&st).await?;
            self.drain(st.ino).await?;
            let creds = st.creds.clone();
            return rpc!(st.server, write(creds, file, offset, data)).await;
        }
        if self.may_write_behind(&st) {
            return self.write_behind(st, offset, data).await;
        }
        self.drain(st.ino).await?;
        let (creds, file) = (st.creds.clone(), st.file.clone());
        rpc!(st.server, write(creds, file, offset, data)).await
    }

    /// The O_APPEND-free twin of an open (see [`OpenState::positional`]).
    async fn positional_open(self: &Arc<Self>, st: &OpenState) -> FsResult<OpenFile> {
        let file = st
            .positional
            .get_or_try_init(|| async {
                let flags = st.file.flags & !libc::O_APPEND;
                let (creds, handle) = (st.creds.clone(), st.file.handle.clone());
                let opened = rpc!(st.server, open(creds, handle, flags)).await?;
                Ok::<_, FsError>(OpenFile {
                    id: opened.id,
                    handle: st.file.handle.clone(),
                    flags,
                })
            })
            .await?;
        Ok(file.clone())
    }

    /// After a read or write through a handle opened with page caching on a file that
    /// has since become write-shared: drop the pages just cached, so the next read
    /// asks the server.
    pub(crate) fn after_io(&self, ino: u64, fh: u64) {
        let direct = self.open_state(fh).map(|s| s.direct).unwrap_or(true);
        if direct {
            return;
        }
        let uncached = self
            .inodes
            .lock()
            .expect("inode lock")
            .get(ino)
            .is_some_and(|n| n.uncached);
        if uncached {
            self.notify.inval_inode(ino);
        }
    }

    pub(crate) async fn flush(self: &Arc<Self>, fh: u64, lock_owner: u64) -> FsResult<()> {
        let st = self.open_state(fh)?;
        let queued = self.drain(st.ino).await;
        let locked = self.locked.lock().expect("locked lock").contains(&st.ino);
        if locked {
            let file = st.file.clone();
            rpc!(st.server, flush(file, lock_owner)).await?;
        }
        queued
    }

    pub(crate) async fn release(
        self: &Arc<Self>,
        fh: u64,
        lock_owner: Option<u64>,
    ) -> FsResult<()> {
        let st = self
            .opens
            .lock()
            .expect("opens lock")
            .remove(&fh)
            .ok_or_else(|| {
                FsError::new(libc::EBADF, format!("release of unknown open file {fh}"))
            })?;
        if let Err(e) = self.drain_and_prune(st.ino).await {
            tracing::warn!(error = %e, "a background write failed and no flush or fsync was left to report it");
        }
        if let Some(twin) = st.positional.get().cloned() {
            let none: Option<u64> = None;
            if let Err(e) = rpc!(st.server, release(twin, none)).await {
                tracing::warn!(error = %e, "release of the positional twin open failed");
            }
        }
        let file = st.file.clone();
        rpc!(st.server, release(file, lock_owner)).await
    }

    pub(crate) async fn fsync(self: &Arc<Self>, fh: u64, datasync: bool) -> FsResult<()> {
        let st = self.open_state(fh)?;
        self.drain(st.ino).await?;
        let file = st.file.clone();
        rpc!(st.server, fsync(file, datasync)).await
    }

    pub(crate) async fn statfs(self: &Arc<Self>, ino: u64) -> FsResult<StatFs> {
        if ino == ROOT_INO {
            return Ok(StatFs {
                blocks: 0,
                bfree: 0,
                bavail: 0,
                files: 0,
                ffree: 0,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
            });
        }
        let node = self.node(ino)?;
        let handle = node.handle.clone();
        rpc!(node.server, statfs(handle)).await
    }

    pub(crate) async fn getlk(
        self: &Arc<Self>,
        fh: u64,
        lock_owner: u64,
        lock: Lock,
    ) -> FsResult<Lock> {
        let st = self.open_state(fh)?;
        self.settle(st.ino).await;
        let file = st.file.clone();
        rpc!(st.server, getlk(file, lock_owner, lock)).await
    }

    /// Takes or drops a lock. A blocking request (F_SETLKW) is tried without waiting
    /// at the server, again and again with growing pauses, so that no server thread
    /// and no call deadline is tied up while it waits and a lock is never granted to
    /// a request that has given up.
    pub(crate) async fn setlk(
        self: &Arc<Self>,
        fh: u64,
        lock_owner: u64,
        lock: Lock,
        sleep: bool,
        pid: u32,
    ) -> FsResult<()> {
        let st = self.open_state(fh)?;
        self.settle(st.ino).await;
        self.locked.lock().expect("locked lock").insert(st.ino);
        let file = st.file.clone();
        let (wait, flock) = (false, false);
        let mut pause = Duration::from_millis(10);
        loop {
            let f = file.clone();
            match rpc!(st.server, setlk(f, lock_owner, lock, wait, flock)).await {
                Err(e) if sleep && (e.errno == libc::EAGAIN || e.errno == libc::EACCES) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LOCK_POLL_MAX);
                    // The file may have been closed meanwhile, or the caller
                    // interrupted by a signal.
                    self.open_state(fh)?;
                    if crate::convert::caller_interrupted(pid) {
                        return Err(FsError::new(
                            libc::EINTR,
                            format!("blocking lock: caller {pid} was signalled"),
                        ));
                    }
                }
                r => return r,
            }
        }
    }
}
