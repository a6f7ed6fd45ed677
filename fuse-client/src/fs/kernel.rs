//! The kernel side: fuser's [`Filesystem`] callbacks. Each copies what it needs out
//! of the request, moves the `Reply*` into a tokio task on [`Inner`]'s runtime and
//! returns at once; the task does the work (`ops.rs`, `dir.rs`) and answers.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::fsproto::FsResult;
use fuser::{
    FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow, WriteFlags,
};

use super::{log_err, EntryOut, Inner};
use crate::convert::{creds, errno};
use crate::inodes::ROOT_INO;

/// The fuser file system: a thin shell over [`Inner`].
pub struct FerryFs {
    inner: Arc<Inner>,
}

impl FerryFs {
    pub fn new(inner: Arc<Inner>) -> FerryFs {
        FerryFs { inner }
    }
}

fn reply_entry(reply: ReplyEntry, r: FsResult<EntryOut>, what: &str) {
    match r {
        Ok(e) => reply.entry(&e.ttl, &e.attr, Generation(0)),
        Err(e) => {
            log_err(what, &e);
            reply.error(errno(&e))
        }
    }
}

fn reply_empty(reply: ReplyEmpty, r: FsResult<()>, what: &str) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => {
            log_err(what, &e);
            reply.error(errno(&e))
        }
    }
}

fn reply_attr(reply: ReplyAttr, r: FsResult<(FileAttr, Duration)>, what: &str) {
    match r {
        Ok((attr, ttl)) => reply.attr(&ttl, &attr),
        Err(e) => {
            log_err(what, &e);
            reply.error(errno(&e))
        }
    }
}

fn name_vec(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

impl Filesystem for FerryFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for (name, cap) in [
            ("ASYNC_READ", InitFlags::FUSE_ASYNC_READ),
            ("BIG_WRITES", InitFlags::FUSE_BIG_WRITES),
            ("MAX_PAGES", InitFlags::FUSE_MAX_PAGES),
            ("AUTO_INVAL_DATA", InitFlags::FUSE_AUTO_INVAL_DATA),
            ("POSIX_LOCKS", InitFlags::FUSE_POSIX_LOCKS),
            // flock(2) across nodes. fuser 0.18 drops the request's FUSE_LK_FLOCK bit,
            // so a flock arrives as a whole-file POSIX lock whose owner is its open
            // file description; fs-server takes it as an OFD lock of that owner,
            // which gives flock's per-description semantics (see README: flock and
            // fcntl locks of one file conflict with each other here).
            ("FLOCK_LOCKS", InitFlags::FUSE_FLOCK_LOCKS),
            ("DO_READDIRPLUS", InitFlags::FUSE_DO_READDIRPLUS),
            ("READDIRPLUS_AUTO", InitFlags::FUSE_READDIRPLUS_AUTO),
            ("PARALLEL_DIROPS", InitFlags::FUSE_PARALLEL_DIROPS),
            ("ASYNC_DIO", InitFlags::FUSE_ASYNC_DIO),
            ("CACHE_SYMLINKS", InitFlags::FUSE_CACHE_SYMLINKS),
            // Shared mmap of direct-I/O (write-shared or O_APPEND) files.
            ("DIRECT_IO_ALLOW_MMAP", InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP),
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                tracing::info!(capability = name, ?missing, "kernel lacks FUSE capability");
            }
        }
        tracing::debug!(abi = ?config.kernel_abi(), "FUSE connection initialised");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(name));
        self.inner.spawn(async move {
            let r = inner.lookup(creds, parent.0, name).await;
            match r {
                // A negative entry, cached for the attribute TTL (nodeid 0): repeated
                // lookups of missing names (PATH, imports) stay local. A create
                // elsewhere reaches us as invalidate_entry.
                Err(e) if e.errno == libc::ENOENT && parent.0 != ROOT_INO => {
                    let mut attr = inner.root_attr();
                    attr.ino = INodeNo(0);
                    reply.entry(&inner.ttl(false), &attr, Generation(0))
                }
                r => reply_entry(reply, r, "lookup"),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner
            .inodes
            .lock()
            .expect("inode lock")
            .forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            let r = inner.getattr(ino.0, fh.map(|f| f.0)).await;
            reply_attr(reply, r, "getattr")
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (inner, creds) = (self.inner.clone(), creds(req));
        let set = common::fsproto::SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(crate::convert::set_time),
            mtime: mtime.map(crate::convert::set_time),
        };
        self.inner.spawn(async move {
            let r = inner.setattr(creds, ino.0, set, fh.map(|f| f.0)).await;
            reply_attr(reply, r, "setattr")
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let (inner, creds) = (self.inner.clone(), creds(req));
        self.inner.spawn(async move {
            match inner.readlink(creds, ino.0).await {
                Ok(target) => reply.data(&target),
                Err(e) => {
                    log_err("readlink", &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(name));
        self.inner.spawn(async move {
            let r = inner.mknod(creds, parent.0, name, mode, umask, rdev).await;
            reply_entry(reply, r, "mknod")
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(name));
        self.inner.spawn(async move {
            let r = inner.mkdir(creds, parent.0, name, mode, umask).await;
            reply_entry(reply, r, "mkdir")
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(name));
        self.inner.spawn(async move {
            let r = inner.unlink(creds, parent.0, name, false).await;
            reply_empty(reply, r, "unlink")
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(name));
        self.inner.spawn(async move {
            let r = inner.unlink(creds, parent.0, name, true).await;
            reply_empty(reply, r, "rmdir")
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(link_name));
        let target = target.as_os_str().as_bytes().to_vec();
        self.inner.spawn(async move {
            let r = inner.symlink(creds, parent.0, name, target).await;
            reply_entry(reply, r, "symlink")
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (inner, creds) = (self.inner.clone(), creds(req));
        let (name, newname) = (name_vec(name), name_vec(newname));
        self.inner.spawn(async move {
            let r = inner
                .rename(creds, parent.0, name, newparent.0, newname, flags.bits())
                .await;
            reply_empty(reply, r, "rename")
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(newname));
        self.inner.spawn(async move {
            let r = inner.link(creds, ino.0, newparent.0, name).await;
            reply_entry(reply, r, "link")
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (inner, creds) = (self.inner.clone(), creds(req));
        self.inner.spawn(async move {
            match inner.open(creds, ino.0, flags.0).await {
                Ok((fh, fopen)) => reply.opened(FileHandle(fh), fopen),
                Err(e) => {
                    log_err("open", &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            match inner.read(ino.0, fh.0, offset, size).await {
                Ok(data) => {
                    reply.data(&data);
                    inner.after_io(ino.0, fh.0);
                }
                Err(e) => {
                    log_err("read", &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let inner = self.inner.clone();
        let data = serde_bytes::ByteBuf::from(data.to_vec());
        self.inner.spawn(async move {
            let cache = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
            match inner.write(fh.0, offset, data, cache).await {
                Ok(n) => {
                    reply.written(n);
                    inner.after_io(ino.0, fh.0);
                }
                Err(e) => {
                    log_err("write", &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            let r = inner.flush(fh.0, lock_owner.0).await;
            reply_empty(reply, r, "flush")
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            let r = inner.release(fh.0, lock_owner.map(|o| o.0)).await;
            reply_empty(reply, r, "release")
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            let r = inner.fsync(fh.0, datasync).await;
            reply_empty(reply, r, "fsync")
        });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inner.opendir(creds(req), ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => {
                log_err("opendir", &e);
                reply.error(errno(&e))
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let inner = self.inner.clone();
        self.inner
            .spawn(async move { inner.readdir(ino.0, fh.0, offset, reply).await });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let inner = self.inner.clone();
        self.inner
            .spawn(async move { inner.readdirplus(ino.0, fh.0, offset, reply).await });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.dirs.lock().expect("dirs lock").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // fs-server performs namespace changes durably before answering them.
        reply.ok();
    }

    // Extended attributes are not in the protocol. ENOSYS once makes the kernel stop
    // asking (it answers EOPNOTSUPP itself from then on).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(fuser::Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let inner = self.inner.clone();
        self.inner.spawn(async move {
            match inner.statfs(ino.0).await {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                ),
                Err(e) => {
                    log_err("statfs", &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (inner, creds, name) = (self.inner.clone(), creds(req), name_vec(name));
        self.inner.spawn(async move {
            match inner
                .create(creds, parent.0, name, mode, umask, flags)
                .await
            {
                Ok((entry, fh, fopen)) => reply.created(
                    &entry.ttl,
                    &entry.attr,
                    Generation(0),
                    FileHandle(fh),
                    fopen,
                ),
                Err(e) => {
                    log_err("create", &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let inner = self.inner.clone();
        let lock = proto_lock(start, end, typ, pid);
        self.inner.spawn(async move {
            match inner.getlk(fh.0, lock_owner.0, lock).await {
                Ok(l) => reply.locked(l.start.min(OFFSET_MAX), l.end.min(OFFSET_MAX), l.typ, l.pid),
                Err(e) => {
                    log_err("getlk", &e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let inner = self.inner.clone();
        let lock = proto_lock(start, end, typ, pid);
        let caller = req.pid();
        self.inner.spawn(async move {
            let r = inner.setlk(fh.0, lock_owner.0, lock, sleep, caller).await;
            reply_empty(reply, r, "setlk")
        });
    }
}

/// The kernel's "to end of file" (OFFSET_MAX); the protocol says u64::MAX.
const OFFSET_MAX: u64 = i64::MAX as u64;

fn proto_lock(start: u64, end: u64, typ: i32, pid: u32) -> common::fsproto::Lock {
    common::fsproto::Lock {
        start,
        end: if end >= OFFSET_MAX { u64::MAX } else { end },
        typ,
        pid,
    }
}
