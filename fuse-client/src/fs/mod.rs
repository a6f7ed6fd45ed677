//! The FUSE file system: fuser's `Filesystem` callbacks mapped onto the file
//! service.
//!
//! Every callback copies what it needs out of the request, moves the `Reply*` into a
//! tokio task and returns at once, so the FUSE threads never wait on the network. The
//! task makes the call(s) through [`ServerConn`] and answers the kernel.
//!
//! State shared by the tasks lives in [`Inner`]: the inode table, the open files and
//! directories, the volume list, and the notification queue. `kernel.rs` holds the
//! fuser callbacks, `ops.rs` the operations, `dir.rs` the directory listing,
//! `writeback.rs` write-behind.

mod dir;
mod kernel;
mod ops;
mod writeback;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::auth::ClusterKey;
use common::config::NodeConfig;
use common::fsproto::{Creds, FsResult, OpenFile};
use fuser::{FileAttr, FileType, INodeNo};

use crate::conn::{CallbackSink, ServerConn};
use crate::inodes::{InodeTable, ROOT_INO};
use crate::notify::NotifyQueue;
use crate::volumes::Volumes;

pub use dir::DirState;
pub use kernel::FerryFs;

/// An open file of ours.
#[derive(Debug)]
pub struct OpenState {
    pub ino: u64,
    pub server: Arc<ServerConn>,
    pub file: OpenFile,
    /// The opener's credentials: reads and writes go on with them (POSIX checks at
    /// open time only).
    pub creds: Creds,
    /// Opened with FOPEN_DIRECT_IO (no page cache for this handle).
    pub direct: bool,
    /// For O_APPEND opens: a second server open without O_APPEND, made on first
    /// need, for page-cache write-back (shared mmap) which must land at its offset.
    pub positional: tokio::sync::OnceCell<OpenFile>,
}

/// What an entry reply carries.
pub struct EntryOut {
    pub attr: FileAttr,
    pub ttl: Duration,
}

/// Everything the tasks share.
pub struct Inner {
    pub(crate) rt: tokio::runtime::Handle,
    pub(crate) servers: HashMap<String, Arc<ServerConn>>,
    pub(crate) inodes: Mutex<InodeTable>,
    pub(crate) volumes: tokio::sync::Mutex<Volumes>,
    pub(crate) opens: Mutex<HashMap<u64, Arc<OpenState>>>,
    pub(crate) dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirState>>>>,
    next_fh: AtomicU64,
    pub(crate) writebehind: writeback::WriteBehinds,
    /// Files on which this client ever took a lock: only their close (flush) has
    /// locks to release at the server.
    pub(crate) locked: Mutex<std::collections::HashSet<u64>>,
    pub(crate) notify: NotifyQueue,
    attr_ttl: Duration,
    mounted_at: SystemTime,
    me: std::sync::Weak<Inner>,
}

impl Inner {
    /// Builds the shared state with one [`ServerConn`] per cluster node.
    pub fn new(
        config: &NodeConfig,
        key: ClusterKey,
        rt: tokio::runtime::Handle,
        notify: NotifyQueue,
    ) -> Arc<Inner> {
        Arc::new_cyclic(|me: &std::sync::Weak<Inner>| {
            let sink: std::sync::Weak<dyn CallbackSink> = me.clone();
            let servers = config
                .nodes
                .iter()
                .map(|n| {
                    let conn = ServerConn::new(
                        n.name.clone(),
                        config.fs_addr(n),
                        key.clone(),
                        config.node.clone(),
                        config.fs.max_frame_bytes,
                        config.reconnect_timeout(),
                        sink.clone(),
                    );
                    (n.name.clone(), conn)
                })
                .collect();
            Inner {
                rt,
                servers,
                inodes: Mutex::new(InodeTable::default()),
                volumes: tokio::sync::Mutex::new(Volumes::default()),
                opens: Mutex::new(HashMap::new()),
                dirs: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                writebehind: writeback::WriteBehinds::default(),
                locked: Mutex::new(std::collections::HashSet::new()),
                notify,
                attr_ttl: Duration::from_millis(config.fuse.attr_ttl_ms),
                mounted_at: SystemTime::now(),
                me: me.clone(),
            }
        })
    }

    pub(crate) fn ttl(&self, uncached: bool) -> Duration {
        if uncached {
            Duration::ZERO
        } else {
            self.attr_ttl
        }
    }

    /// The attributes the kernel sees for our `ino`, the size raised to cover
    /// writes still in flight.
    pub(crate) fn attr_of(&self, ino: u64, a: &common::fsproto::Attr) -> FileAttr {
        let mut attr = crate::convert::file_attr(ino, a);
        attr.size = self.writebehind.size_floor(ino, attr.size);
        attr
    }

    pub(crate) fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn open_state(&self, fh: u64) -> FsResult<Arc<OpenState>> {
        self.opens
            .lock()
            .expect("opens lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| common::fsproto::FsError::new(libc::EBADF, format!("no open file {fh}")))
    }

    /// The super-root's attributes.
    pub(crate) fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT_INO),
            size: 0,
            blocks: 0,
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(fut);
    }
}

impl CallbackSink for Inner {
    fn invalidate(
        &self,
        server: &str,
        ino: u64,
        uncached: bool,
    ) -> futures::future::BoxFuture<'static, ()> {
        let inos = {
            let mut table = self.inodes.lock().expect("inode lock");
            let inos = table.by_server_ino(server, ino);
            if uncached {
                for &i in &inos {
                    table.set_uncached(i, true);
                }
            }
            inos
        };
        let me = self.me.upgrade();
        let notify = self.notify.clone();
        Box::pin(async move {
            for i in inos {
                // Our queued writes land first: the node the server is calling us
                // back for must read them.
                if let Some(me) = &me {
                    me.settle(i).await;
                }
                let _ = notify.inval_inode_wait(i).await;
            }
        })
    }

    fn invalidate_entry(&self, server: &str, parent_ino: u64, name: Vec<u8>) {
        let parents = self
            .inodes
            .lock()
            .expect("inode lock")
            .by_server_ino(server, parent_ino);
        for p in parents {
            self.notify.inval_entry(p, name.clone());
        }
    }

    fn reconnected(&self, server: &str) {
        // The server may have restarted and lost track of what we cache: drop it all.
        let inos = self.inodes.lock().expect("inode lock").of_server(server);
        tracing::info!(%server, files = inos.len(), "dropping cached data of the reconnected server's files");
        for i in inos {
            self.notify.inval_inode(i);
        }
    }
}

/// Expected outcomes (a missing name, a full disk, a refused permission) are logged
/// at debug; the rest at warn.
fn log_err(what: &str, e: &common::fsproto::FsError) {
    match e.errno {
        libc::ENOENT
        | libc::EEXIST
        | libc::ENOTEMPTY
        | libc::EACCES
        | libc::EPERM
        | libc::EAGAIN
        | libc::ENOTDIR
        | libc::EISDIR
        | libc::EXDEV
        | libc::ENODATA
        | libc::ENOSYS
        | libc::EROFS
        | libc::ENAMETOOLONG
        | libc::ENOSPC
        | libc::EINVAL => {
            tracing::debug!(op = what, error = %e, "refused")
        }
        _ => tracing::warn!(op = what, error = %e, "failed"),
    }
}

/// Errno for operations the super-root refuses (it is read-only).
pub(crate) fn root_is_read_only(what: &str) -> common::fsproto::FsError {
    common::fsproto::FsError::new(
        libc::EPERM,
        format!(
            "{what}: the super-root lists volumes only; nothing can be created or changed in it"
        ),
    )
}
